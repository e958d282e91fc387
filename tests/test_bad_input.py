"""Bad input never gets in: a corpus of broken data sets and prediction folders (built here, never committed)
runs through check-data, preprocess, predict, merge and training. Each command exits non-zero in seconds,
names the case and the file, prints no traceback and leaves nothing that a later command would trust;
predict and merge killed with SIGKILL at several points leave folders that the next command refuses, and a
rerun finishes only the missing cases."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_lightning.cli import main
from brats_lightning.data.layout import find_cases
from brats_lightning.data.preprocess import CaseCache
from brats_lightning.errors import EXIT_USER_ERROR, UserError
from brats_lightning.predictions import MANIFEST, label_map_paths, mark_incomplete, require_complete

REPO = Path(__file__).resolve().parents[1]
CLEAN, BAD = "case_000", "case_001"


def _rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj) if data is None else data
    new = nib.Nifti1Image(data, image.affine if affine is None else affine)
    new.set_data_dtype(data.dtype)
    new.to_filename(path)


def _file(root: Path, key: str, case: str = BAD) -> Path:
    return root / case / f"{case}_{key}.nii.gz"


def _break_nan(root: Path) -> str:
    t1 = _file(root, "t1")
    data = np.asanyarray(nib.load(t1).dataobj).astype(np.float32)
    data[10, 12, 8], data[11, 12, 8] = np.nan, np.inf
    _rewrite(t1, data)
    return "t1 holds 2 non-finite voxels"


def _break_labels(code: int):
    def apply(root: Path) -> str:
        seg = _file(root, "seg")
        data = np.asanyarray(nib.load(seg).dataobj).copy()
        data[data == 4] = code  # the ET label becomes 3 (BraTS 2023's ET) or 7 (nothing)
        _rewrite(seg, data)
        return f"seg holds label(s) [{code}]"
    return apply


def _break_affine(root: Path) -> str:
    t2 = _file(root, "t2")
    affine = nib.load(t2).affine.copy()
    affine[0, 3] += 5.0
    _rewrite(t2, affine=affine)
    return "t2 affine differs from t1's"


def _break_pixdim(root: Path) -> str:
    flair = _file(root, "flair")
    image = nib.load(flair)
    image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
    image.header["pixdim"][1:4] = [1.0, 1.0, 1.0]  # the affine says 2 x 2 x 2.5 mm
    image.to_filename(flair)
    assert nib.load(flair).header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    return "flair pixdim (1.0, 1.0, 1.0) mm disagrees with its affine's voxel size (2.0, 2.0, 2.5) mm"


def _break_4d(root: Path) -> str:
    t1ce = _file(root, "t1ce")
    data = np.asanyarray(nib.load(t1ce).dataobj)
    _rewrite(t1ce, np.stack([data, data], axis=-1))
    return "t1ce has shape (22, 26, 18, 2); expected a 3-D volume"


def _break_truncated(root: Path) -> str:
    t1 = _file(root, "t1")
    t1.write_bytes(t1.read_bytes()[:400])
    return "t1 unreadable"


def _break_missing(root: Path) -> str:
    _file(root, "flair").unlink()
    return "flair missing"


BREAKAGES = {"nan": _break_nan, "label3": _break_labels(3), "label7": _break_labels(7),
             "affine": _break_affine, "pixdim": _break_pixdim, "4d": _break_4d, "truncated": _break_truncated,
             "missing": _break_missing}
IMAGE_BREAKAGES = [k for k in BREAKAGES if not k.startswith("label")]  # what predict reads: images only


@pytest.fixture
def corpus(tmp_path, case_writer):
    """``{kind: (data set root, key phrase of the expected message)}``: two cases each, case_001 broken."""
    clean = tmp_path / "clean"
    for i in range(2):
        case_writer(clean, f"case_{i:03d}", seed=i)
    sets = {}
    for kind, breakage in BREAKAGES.items():
        root = tmp_path / kind
        shutil.copytree(clean, root)
        sets[kind] = (root, breakage(root))
    return sets


def _run(capsys, *argv: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err, time.perf_counter() - start


def _assert_reported(code: int, text: str, seconds: float, root: Path, phrase: str, expected_code: int = 2):
    assert code == expected_code, text
    assert BAD in text and phrase in text, text
    assert "Traceback" not in text
    assert seconds < 30
    assert CLEAN + " " not in text.replace(f"{CLEAN}_", "")  # the clean case is not reported


def test_check_data_reports_each_kind(corpus, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per problem, unwrapped
    for root, phrase in corpus.values():
        code, text, seconds = _run(capsys, "check-data", str(root), "--workers", "1")
        _assert_reported(code, text, seconds, root, phrase, expected_code=1)


def test_preprocess_refuses_each_kind_and_caches_nothing_for_it(corpus, capsys, tmp_path):
    for kind, (root, phrase) in corpus.items():
        cache = tmp_path / "cache" / kind
        code, text, seconds = _run(capsys, "preprocess", str(root), "--pipeline", "A", "--cache", str(cache),
                                   "--workers", "1")
        _assert_reported(code, text, seconds, root, phrase)
        assert f"{BAD}/{BAD}_" in text or kind == "missing"  # the file, relative to the data root
        entries = {p.name for p in cache.glob("minmax/*/*") if not p.name.startswith(".")}
        assert BAD not in entries  # nothing cached for the bad case: a later run can't read it


def test_whole_corpus_in_one_table_once_per_case_with_two_workers(corpus, capsys, tmp_path):
    """Every bad case of a data set is listed (not only the first), each once, also with --workers 2."""
    root = tmp_path / "everything"
    root.mkdir()
    for kind, (src, _) in corpus.items():
        for path in (src / BAD).iterdir():
            target = root / f"{kind}_{BAD}" / path.name.replace(BAD, f"{kind}_{BAD}")
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(path, target)
    shutil.copytree(corpus["nan"][0] / CLEAN, root / CLEAN)
    code, text, seconds = _run(capsys, "preprocess", str(root), "--pipeline", "B", "--cache",
                               str(tmp_path / "cache"), "--workers", "2")
    assert code == 2 and "Traceback" not in text and seconds < 60
    assert f"problem(s) in {len(BREAKAGES)} case(s)" in text, text
    for kind in BREAKAGES:
        assert text.count(f"  {kind}_{BAD}  ") == 1, (kind, text)  # reported once
    assert CaseCache(tmp_path / "cache", "zscore").is_fresh(find_cases(root / CLEAN)[0])  # clean: cached


def test_predict_refuses_bad_images_and_writes_nothing(corpus, capsys, tmp_path, tiny_run_factory):
    import brats_lightning.inference.predictor  # noqa: F401 - imported (torch, Lightning) outside the timing

    tiny_run_factory(pipeline="A")
    for kind in IMAGE_BREAKAGES:
        root, phrase = corpus[kind]
        out = tmp_path / "pred" / kind
        code, text, seconds = _run(capsys, "predict", "--runs", str(tiny_run_factory.root), "--data",
                                   str(root), "--out", str(out), "--tta", "none", "--no-probs")
        _assert_reported(code, text, seconds, root, phrase)
        assert not out.exists() or not any(out.iterdir())
    # predict reads the images only: a bad seg (labels of another year) does not stop it
    code, text, _ = _run(capsys, "predict", "--runs", str(tiny_run_factory.root), "--data",
                         str(corpus["label3"][0]), "--out", str(tmp_path / "pred" / "label3"),
                         "--tta", "none")
    assert code == 0, text
    assert require_complete(tmp_path / "pred" / "label3")["cases"] == [CLEAN, BAD]


def _labels(seed: int, shape=(22, 26, 18)) -> np.ndarray:
    return np.random.default_rng(seed).choice([0, 1, 2, 4], size=shape).astype(np.uint8)


AFFINE = np.diag([-2.0, 2.0, 2.5, 1.0])


def _prediction_folder(folder: Path, n: int, seed: int, shape=(22, 26, 18)) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        nib.Nifti1Image(_labels(seed + i, shape), AFFINE).to_filename(folder / f"case_{i:03d}.nii.gz")
    (folder / MANIFEST).write_text(json.dumps({"kind": "predict", "label_convention": "brats2020",
                                               "cases": [f"case_{i:03d}" for i in range(n)],
                                               "complete": True}))


def test_merge_refuses_each_kind_and_writes_nothing(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _prediction_folder(a, 2, 0)
    _prediction_folder(b, 2, 10)
    bad = b / f"{BAD}.nii.gz"
    good = bad.read_bytes()
    kinds = {
        "label7": (lambda: nib.Nifti1Image(np.where(_labels(11) == 4, 7, _labels(11)).astype(np.uint8),
                                           AFFINE).to_filename(bad), "B label map holds codes [7]"),
        "4d": (lambda: nib.Nifti1Image(np.stack([_labels(11)] * 2, -1), AFFINE).to_filename(bad),
               "B label map has shape (22, 26, 18, 2)"),
        "truncated": (lambda: bad.write_bytes(good[:300]), "B label map unreadable"),
        "nan": (lambda: nib.Nifti1Image(np.full((22, 26, 18), np.nan, np.float32), AFFINE).to_filename(bad),
                "non-finite values"),
        "affine": (lambda: nib.Nifti1Image(_labels(11), np.diag([2.0, 2.0, 2.5, 1.0])).to_filename(bad),
                   "B's affine differs from A's"),
    }
    for kind, (breakage, phrase) in kinds.items():
        breakage()
        out = tmp_path / "m" / kind
        code, text, seconds = _run(capsys, "merge", "--a", str(a), "--b", str(b), "--out", str(out))
        assert code == EXIT_USER_ERROR and BAD in text and str(bad) in text and phrase in text, (kind, text)
        assert "Traceback" not in text and seconds < 30 and not out.exists()
        bad.write_bytes(good)
    mark_incomplete(b, "predict")  # as a killed predict leaves it
    code, text, _ = _run(capsys, "merge", "--a", str(a), "--b", str(b), "--out", str(tmp_path / "m" / "x"))
    assert code == EXIT_USER_ERROR and "incomplete: rerun predict" in text and str(b) in text
    assert "Traceback" not in text and not (tmp_path / "m" / "x").exists()


def _kill_after(command: list[str], folder: Path, n_files: int, timeout: float = 240) -> int:
    """Start ``command``, SIGKILL it once ``folder`` holds ``n_files`` label maps (0: once its manifest says
    incomplete); returns how many label maps were there when it died. Fails if the command finished first."""
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            manifest = folder / MANIFEST
            started = manifest.is_file() and '"complete": false' in manifest.read_text()
            if started and len(list(folder.glob("case_*[0-9].nii.gz"))) >= n_files:
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(label_map_paths(folder))


def _assert_untrusted(folder: Path, capsys, tmp_path: Path) -> None:
    """What a later command sees in a killed run's folder: refused as incomplete, never scored or merged."""
    with pytest.raises(UserError, match="incomplete: rerun predict"):
        require_complete(folder)
    code, text, _ = _run(capsys, "merge", "--a", str(folder), "--b", str(folder), "--out",
                         str(tmp_path / "never"))
    assert code == EXIT_USER_ERROR and "incomplete: rerun predict" in text and "Traceback" not in text


@pytest.mark.slow
def test_sigkilled_merge_leaves_nothing_trusted_and_a_rerun_finishes(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shape = (96, 96, 64)  # big enough that a case takes a few milliseconds to merge
    _prediction_folder(a, 12, 0, shape)
    _prediction_folder(b, 12, 100, shape)
    cli = [sys.executable, "-m", "brats_lightning.cli", "merge", "--a", str(a), "--b", str(b), "--out"]
    for n_files in (0, 1, 5):
        out = tmp_path / f"m{n_files}"
        shutil.copytree(a, out)  # an older, complete folder: its manifest must not outlive the kill
        left = _kill_after([*cli, str(out)], out, n_files)
        assert left >= n_files
        _assert_untrusted(out, capsys, tmp_path)
        assert main(["merge", "--a", str(a), "--b", str(b), "--out", str(out)]) == 0
        assert require_complete(out)["cases"] == [f"case_{i:03d}" for i in range(12)]


@pytest.mark.slow
def test_sigkilled_predict_leaves_nothing_trusted_and_a_rerun_finishes(tmp_path, capsys, case_writer,
                                                                      tiny_run_factory):
    data = tmp_path / "data"
    for i in range(6):
        case_writer(data, f"case_{i:03d}", shape=(40, 44, 36), seed=i)
    tiny_run_factory(pipeline="A")
    cli = [sys.executable, "-m", "brats_lightning.cli", "predict", "--runs", str(tiny_run_factory.root),
           "--data", str(data), "--tta", "none", "--device", "cpu", "--out"]
    for n_files in (0, 2):
        out = tmp_path / f"p{n_files}"
        left = _kill_after([*cli, str(out)], out, n_files)
        assert left >= n_files
        _assert_untrusted(out, capsys, tmp_path)
        # the incomplete manifest lists the cases finished before the kill (a label map written just before
        # the kill but not yet listed is predicted again)
        listed = json.loads((out / MANIFEST).read_text())["cases"]
        stamps = {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in listed}
        code, text, _ = _run(capsys, *cli[3:], str(out))
        assert code == 0, text
        assert require_complete(out)["cases"] == [f"case_{i:03d}" for i in range(6)]
        assert {c: (out / f"{c}.nii.gz").stat().st_mtime_ns for c in listed} == stamps  # kept, not redone


@pytest.mark.slow
def test_training_on_bad_data_stops_before_training_with_one_message(corpus, tmp_path):
    """train.py on a data set with a NaN case: exit 2 before any training step, the case named, no traceback,
    no checkpoint or run.json."""
    root = corpus["nan"][0]
    for i in range(2, 6):  # enough cases for two folds
        shutil.copytree(root / CLEAN, root / f"case_{i:03d}")
        for path in (root / f"case_{i:03d}").iterdir():
            path.rename(path.with_name(path.name.replace(CLEAN, f"case_{i:03d}")))
    env = dict(os.environ, WANDB_MODE="disabled")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"data.root={root}",
         "data.generate=null", "data.n_folds=2", f"hydra.run.dir={tmp_path / 'run'}",
         f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert f"{BAD}/{BAD}_t1.nii.gz: t1 holds 2 non-finite voxels" in text and "Traceback" not in text
    run_dir = tmp_path / "run"
    assert not (run_dir / "run.json").exists() and not list(run_dir.glob("checkpoints/*.ckpt"))
    assert not (run_dir / ".brats-lightning.lock").exists()  # released
