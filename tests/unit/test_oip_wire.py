"""The OIP wire reader against messages the generated stubs write (and bytes they never would)."""
from __future__ import annotations

import pytest
from sidecar_client.inference import grpc_service_pb2 as oip

from sidecar.oip.wire import MAX_TOP_LEVEL_FIELDS, WireError, bool_value, model_and_version, string_field


def test_reads_name_and_version_past_tensors_of_every_kind() -> None:
    request = oip.ModelInferRequest(model_name="résnet", model_version="3", id="x", raw_input_contents=[b"\x00" * 70_000])
    request.parameters["p"].double_param = 1.5
    request.inputs.add(name="in", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.0, 2.0])
    request.outputs.add(name="out")
    assert model_and_version(request.SerializeToString()) == ("résnet", "3")
    assert model_and_version(oip.ModelReadyRequest(name="m").SerializeToString()) == ("m", "")
    assert model_and_version(b"") == ("", "")


def test_the_last_occurrence_wins_as_in_protobuf() -> None:
    data = oip.ModelInferRequest(model_name="a").SerializeToString() + oip.ModelInferRequest(
        model_name="b", model_version="2").SerializeToString()
    assert model_and_version(data) == ("b", "2") == (oip.ModelInferRequest.FromString(data).model_name, "2")


@pytest.mark.parametrize("data", [
    b"\x0a\x05ab",            # truncated string
    b"\x0a",                  # truncated length
    b"\x08\x01",              # field 1 as a varint
    b"\x0a\x02\xff\xfe",      # not UTF-8
    b"\x00\x01",              # field number 0
    b"\x1b",                  # a group
    b"\x0a" + b"\xff" * 11,   # a varint that never ends
])
def test_malformed_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        model_and_version(data)


def test_too_many_top_level_fields_are_refused() -> None:
    with pytest.raises(WireError, match="top-level fields"):
        model_and_version(b"\x18\x01" * (MAX_TOP_LEVEL_FIELDS + 1))


def test_small_messages_the_sidecar_writes_and_reads() -> None:
    assert oip.ModelReadyRequest.FromString(string_field(1, "m")).name == "m"
    assert bool_value(oip.ModelReadyResponse(ready=True).SerializeToString(), 1)
    assert not bool_value(oip.ModelReadyResponse(ready=False).SerializeToString(), 1)
    with pytest.raises(WireError):
        bool_value(b"\x0a\x05", 1)
