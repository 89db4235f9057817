"""Frame sources: files, folders, globs, cameras, clear errors, masked secrets."""


import cv2
import pytest

from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import SourceError, open_source
from tests.stream_fakes import DarkSpotEngine, _frames, _records


def test_folder_and_glob_sources_count_undecodable_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_frames(5, bad={2})):
        cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    (folder / "99.png").write_bytes(b"not a png")
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(folder)), RunOptions(tmp_path / "o1"))
    assert (summary["frames_read"], summary["frames_inspected"], summary["frames_failed"]) == (6, 5, 1)
    failed = [r for r in _records(tmp_path / "o1") if r["status"] == "failed"]
    assert len(failed) == 1 and "99.png" in failed[0]["error"]
    summary = run_stream(lambda: DarkSpotEngine(), open_source(str(folder / "0*.png")), RunOptions(tmp_path / "o2"))
    assert summary["frames_read"] == 5 and summary["frames_anomalous"] == 1


def test_missing_camera_and_bad_spec_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="camera 97"):
        open_source("97")
    with pytest.raises(SourceError, match="not a camera index"):
        open_source(str(tmp_path / "nothing-here.mp4"))
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "*.png"))


def test_secrets_are_masked_in_errors():
    with pytest.raises(SourceError) as info:
        open_source("rtsp://admin:hunter2@127.0.0.1:1/stream")
    assert "hunter2" not in str(info.value) and "admin:***@" in str(info.value)


@pytest.mark.parametrize("text, secret, kept", [
    ("rtsp://admin:hunter2@cam/stream", "hunter2", "rtsp://admin:***@cam/stream"),
    ("rtsp://admin:pa/ss@w0rd@10.0.0.5:554/live", "pa/ss@w0rd", "rtsp://admin:***@10.0.0.5:554/live"),
    ("rtspsrc location=rtsp://cam/x user-id=admin user-pw=hunter2 ! decodebin", "hunter2", "user-pw=*** ! decodebin"),
    ('rtspsrc location=rtsp://cam/x user-pw="two words" ! fakesink', "two words", 'user-pw="***"'),
    ("http://cam/snapshot.cgi?user=admin&password=hunter2&res=hd", "hunter2", "password=***&res=hd"),
    ("https://hook.example/x?token=abc123", "abc123", "token=***"),
])
def test_every_spelling_of_a_credential_is_masked(text, secret, kept):
    from stfpm_edge.fileio import mask_secrets

    masked = mask_secrets(text)
    assert secret not in masked and kept in masked, masked
    assert mask_secrets("rtsp://cam/stream?res=hd") == "rtsp://cam/stream?res=hd"
