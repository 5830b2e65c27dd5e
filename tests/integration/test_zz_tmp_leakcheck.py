import time
from tests.harness.servers import TansuBroker

def test_sleeps(fresh_tansu: TansuBroker, redis_url: str, kafka_bootstrap: str) -> None:
    time.sleep(30)
