"""The reward server's request checks without a server: JSON depth, PNG headers, pixel limits, scores."""
import base64
import json
import math
import struct
import zlib

import pytest
import torch

from rcgrpo.rewards.codec import decode_png_base64, encode_png_base64, png_size_base64
from rcgrpo.rewards.protocol import RequestError, RequestLimits, check_scores, json_depth, parse_score_request


def png_header_only(width: int, height: int) -> str:
    """A base64 PNG that is only a signature and an IHDR chunk claiming `width` x `height`."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


def _body(edited, sources=None, instructions=None):
    data = {"edited": edited, "instructions": instructions or ["x"] * len(edited)}
    if sources is not None:
        data["sources"] = sources
    return json.dumps(data).encode()


def test_png_size_is_read_from_the_header():
    img = torch.rand(3, 7, 13)
    assert png_size_base64(encode_png_base64(img)) == (13, 7)
    assert png_size_base64(png_header_only(60000, 50000)) == (60000, 50000)
    decoded = decode_png_base64(encode_png_base64(img))
    assert decoded.size == (13, 7) and decoded.mode == "RGB"
    with pytest.raises(ValueError, match="not a PNG"):
        png_size_base64(base64.b64encode(b"GIF89a" + b"\0" * 40).decode())
    with pytest.raises(ValueError, match="base64"):
        png_size_base64("!!!!" * 10)
    with pytest.raises(ValueError, match="not a base64 string"):
        png_size_base64(12)


def test_only_png_reaches_the_decoder():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match="not a readable PNG"):
        decode_png_base64(base64.b64encode(buf.getvalue()).decode())


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": [1, 2, {"b": "[[[[{{{{"}]}', 100) == 3
    assert json_depth(b'{"s": "a \\" [ [ [ \\\\"}', 100) == 1
    assert json_depth(b"[" * 200_000, 8) == 9  # stops just past the limit
    assert json_depth(b'"just a string"', 8) == 0


def test_deep_nesting_is_a_400_before_parsing():
    limits = RequestLimits(max_json_depth=8)
    with pytest.raises(RequestError, match="nested deeper than 8") as err:
        parse_score_request(b"[" * 200_000 + b"]" * 200_000, limits)
    assert err.value.status == 400


def test_pixel_cap_and_budget_are_413_with_the_limits():
    limits = RequestLimits(max_image_pixels=100 * 100, max_request_pixels=3 * 80 * 80)
    small = png_header_only(80, 80)
    with pytest.raises(RequestError) as err:
        parse_score_request(_body([png_header_only(101, 100)]), limits)
    assert err.value.status == 413 and "101x100 = 10100 pixels" in str(err.value) and "at most 10000" in str(err.value)
    with pytest.raises(RequestError) as err:
        parse_score_request(_body([small, small], [small, small]), limits)
    assert err.value.status == 413 and "25600 pixels in 4 images" in str(err.value) and "19200" in str(err.value)
    request = parse_score_request(_body([small], [small]), limits)  # within both: decoded later
    assert request.pixels == 2 * 80 * 80 and len(request) == 1
    with pytest.raises(RequestError, match=r"edited\[0\] is not a readable PNG") as err:
        request.decode_images()  # the header is all there is
    assert err.value.status == 400


def test_image_count_limit_and_fields():
    limits = RequestLimits(max_images=3)
    img = encode_png_base64(torch.rand(3, 4, 4))
    with pytest.raises(RequestError, match="4 images; the server accepts at most 3") as err:
        parse_score_request(_body([img, img], [img, img]), limits)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="unknown request fields"):
        parse_score_request(json.dumps({"edited": [img], "instructions": ["x"], "extra": 1}).encode(), limits)
    with pytest.raises(RequestError, match="needs 'sources'"):
        parse_score_request(_body([img]), limits, require_sources=True)
    with pytest.raises(RequestError, match=r"sources\[0\] must be a base64 string"):
        parse_score_request(_body([img], [7]), limits)
    edited, sources = parse_score_request(_body([img], [img]), limits).decode_images()
    assert edited[0].size == (4, 4) and sources[0].size == (4, 4)


def test_check_scores():
    assert check_scores([1, 2.5], 2) == [1.0, 2.5]
    assert check_scores(torch.tensor([0.5, math.nan]), 2) == [0.5, None]
    with pytest.raises(ValueError, match="2 scores for 3"):
        check_scores([1, 2], 3)
    with pytest.raises(ValueError, match="bool"):
        check_scores([True], 1)


def test_limits_validate():
    with pytest.raises(ValueError, match="max_image_pixels"):
        RequestLimits(max_image_pixels=0).validate()
    with pytest.raises(ValueError, match="max_json_depth"):
        RequestLimits(max_json_depth=1).validate()
