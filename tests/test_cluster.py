"""A real multi-node Ray on this machine (`ray.cluster_utils.Cluster`, in its own process beside
the session's local Ray): a worker node lost in the middle of `avray preprocess` costs no clip and
duplicates none."""

import json
import subprocess
import sys
from pathlib import Path

from tests import mediagen

FILES, SECONDS = 12, 6.0


def test_a_worker_node_lost_during_preprocess_loses_and_duplicates_nothing(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for i in range(FILES):
        mediagen.write_video(media / f"v{i:02d}.mp4", seconds=SECONDS, width=320, height=240, fps=25)
    script = Path(__file__).resolve().parent / "cluster" / "node_loss.py"
    proc = subprocess.run([sys.executable, str(script), str(media), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["removed"] and res["parts_when_removed"] < FILES  # the node went while files were left
    assert res["alive_nodes"] == 2  # the head and the surviving worker
    # every clip of every file, once: the lost node's task ran again on the other, skipping the files
    # it had committed before the node went (those count as skipped, done already)
    assert (res["rc"], res["files_failed"], res["files_ok"] + res["files_skipped"]) == (0, 0, FILES)
    assert res["clips"] == res["unique_clips"] == res["out_clips"] == FILES * int(SECONDS)
    from pipelines.sources import video_id
    expected = sorted(f"{video_id(str((media / f'v{i:02d}.mp4').resolve()))}-{k:05d}" for i in range(FILES) for k in range(int(SECONDS)))
    assert res["clip_ids"] == expected
