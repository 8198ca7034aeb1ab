"""What a run writes: never a file it reads (the model, its external data, the data files, a
``--load-solution`` folder's files), and the output model, its external data file and the report
written as one unit: all replaced or none, with the mode a newly created file gets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner

import onnx_qubo
from onnx_qubo.cli import main
from onnx_qubo.core.errors import OutputError
from onnx_qubo.graph import files

from graphs import mlp_model

X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)


def model_dir(folder: Path) -> Path:
    """``folder/m.onnx`` with ``m.calib.npz`` beside it."""
    onnx.save(mlp_model(), folder / "m.onnx")
    np.savez(folder / "m.calib.npz", x=X)
    return folder / "m.onnx"


def solution_dir(folder: Path) -> Path:
    """A ``--dump-qubo`` folder of the model in ``folder`` with a solution beside each problem."""
    runs.quantize(folder / "m.onnx", folder / "dumped.onnx", solver="rtn", speed=False,
                       dump_qubo=folder / "sol")
    for entry in json.loads((folder / "sol" / "index.json").read_text()):
        with np.load(folder / "sol" / entry["file"]) as problem:
            shape = problem["step"].shape
        np.save(folder / "sol" / entry["file"].replace(".qubo.npz", ".solution.npy"), np.zeros(shape, np.int8))
    return folder / "sol"


def digests(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("flags,message", [
    (["o.onnx", "--report", "sol/fc1.solution.npy"], "--report 'sol/fc1.solution.npy' is a --load-solution file"),
    (["o.onnx", "--report", "sol/index.json"], "--report 'sol/index.json' is a --load-solution file"),
    (["sol/fc0.qubo.npz"], "output 'sol/fc0.qubo.npz' is a --load-solution file"),
    (["sol/fc0.solution.npy"], "output 'sol/fc0.solution.npy' is a --load-solution file"),
    (["o.onnx", "--dump-qubo", "sol"], "--dump-qubo 'sol' holds '[^']+', a --load-solution file"),
], ids=["report-solution", "report-index", "output-problem", "output-solution", "dump-into-it"])
def test_load_solution_files_are_never_written(flags, message, tmp_path, monkeypatch):
    """Used to replace the solution with the report, exit 0."""
    model_dir(tmp_path)
    solution_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = digests(tmp_path)
    result = run("m.onnx", *flags, "--solver", "rtn", "--load-solution", "sol", "--quiet", "--no-speed")
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert re.match(f"Error: {message} this run reads[;,] ", result.output), result.output
    assert digests(tmp_path) == before


def test_load_solution_files_are_never_written_by_the_api(tmp_path):
    model = model_dir(tmp_path)
    solution = solution_dir(tmp_path)
    with pytest.raises(OutputError, match="report_path '.*fc1.solution.npy' is a load_solution file this run reads"):
        runs.quantize(model, tmp_path / "o.onnx", load_solution=solution,
                           report_path=solution / "fc1.solution.npy")
    report = runs.quantize(model, tmp_path / "o.onnx", load_solution=solution, speed=False,
                                report_path=tmp_path / "r.json")  # reading a solution still works
    assert report.solver == "loaded" and (tmp_path / "r.json").is_file()


def test_outputs_may_not_land_in_the_dump_under_its_names(tmp_path, monkeypatch):
    """The dump's index would be replaced by the output model written after it."""
    model = model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    for kwargs, what in (({"output_path": "d/index.json"}, "output"),
                         ({"output_path": "o.onnx", "report_path": "d/fc0.qubo.npz"}, "report_path")):
        with pytest.raises(OutputError, match=f"dump_qubo 'd' would also write '.*', the {what}; choose another"):
            runs.quantize(model, dump_qubo="d", solver="rtn", **kwargs)
    assert list(Path("d").iterdir()) == [] and not Path("o.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["compare", "m.onnx", "--json", "m.calib.npz"], "--json 'm.calib.npz' is a data file"),
    (["compare", "m.onnx", "--markdown", "m.onnx"], "--markdown 'm.onnx' is the input model"),
    (["compare", "m.onnx", "--eval", "e.npz", "--json", "e.npz"], "--json 'e.npz' is a data file"),
    (["sensitivity", "m.onnx", "--json", "m.onnx"], "--json 'm.onnx' is the input model"),
    (["sensitivity", "m.onnx", "--eval", "e.npz", "--json", "e.npz"], "--json 'e.npz' is a data file"),
], ids=["compare-json", "compare-markdown", "compare-eval", "sensitivity-model", "sensitivity-eval"])
def test_other_commands_never_write_their_inputs(args, message, tmp_path, monkeypatch):
    model_dir(tmp_path)
    np.savez(tmp_path / "e.npz", x=X)
    monkeypatch.chdir(tmp_path)
    before = digests(tmp_path)
    result = run(*args, "--quiet")
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(f"Error: {message}"), \
        result.output
    assert digests(tmp_path) == before


def test_rerun_with_external_data_replaces_the_output(tmp_path, monkeypatch):
    """Used to fail at the very end with "External data file exists in o.onnx.data" when run from
    the output's folder (onnx looked for the data file relative to the working directory)."""
    model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    for bits in ("2", "4"):
        result = run("m.onnx", "o.onnx", "--external-data", "--bits", bits, "--solver", "rtn", "--quiet",
                     "--no-speed")
        assert result.exit_code == 0, result.output
        model = onnx.load("o.onnx")  # the model and its data agree: the data was replaced with it
        onnx.checker.check_model(model, full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.calib.npz", "m.onnx", "o.onnx", "o.onnx.data"]


def test_model_over_the_protobuf_limit_is_rerun_with_its_data_beside_it(tmp_path, monkeypatch):
    """Over 2 GB the data always goes beside the model (forced here by lowering the limit)."""
    model_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 100)
    for _ in range(2):
        report = runs.quantize("m.onnx", "o.onnx", solver="rtn", speed=False)
        assert report.output_bytes == os.path.getsize("o.onnx") + os.path.getsize("o.onnx.data")
    onnx.checker.check_model(onnx.load("o.onnx"), full_check=True)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_data_and_report_get_the_mode_of_a_new_file(umask, tmp_path):
    """The data file used to get 0600 while the model got 0644."""
    model = model_dir(tmp_path)
    previous = os.umask(umask)
    try:
        runs.quantize(model, tmp_path / "o.onnx", solver="rtn", speed=False, external_data=True,
                           report_path=tmp_path / "r.json")
        for name in ("o.onnx", "o.onnx.data", "r.json"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    finally:
        os.umask(previous)


REAL = {"replace": os.replace, "link": os.link}


class Interrupt:
    """``os.replace`` and ``os.link`` into ``folder`` that raise ``failure`` at the ``at``-th call
    of those named in ``counted``: an interruption or error at that step of the final write.
    ``links=False``: every ``os.link`` fails, as on a file system without hard links."""

    def __init__(self, monkeypatch, folder: Path, at: int, failure: BaseException, counted: tuple[str, ...],
                 links: bool = True):
        self.folder, self.at, self.failure, self.counted, self.links, self.calls = (
            folder, at, failure, counted, links, 0)
        for name in REAL:
            monkeypatch.setattr(files.os, name, lambda *args, name=name, **kwargs: self.step(name, *args, **kwargs))

    def step(self, name: str, src, dst, **kwargs):
        if Path(os.path.abspath(dst)).is_relative_to(self.folder):
            if name == "link" and not self.links:
                raise OSError(1, "Operation not permitted")
            if name in self.counted:
                self.calls += 1
                if self.calls == self.at:
                    raise self.failure
        return REAL[name](src, dst, **kwargs)


def quantize_into(out: Path, model: Path, bits: int = 2) -> onnx_qubo.Report:
    return runs.quantize(model, out / "o.onnx", bits=bits, solver="rtn", speed=False, external_data=True,
                              report_path=out / "r.json")


WAYS = {  # failure, the calls counted, hard links work, the steps of a new / a replacing write
    "interrupt": (KeyboardInterrupt(), ("replace", "link"), True, 3, 6),
    "error": (OSError(5, "Input/output error"), ("replace",), True, 3, 3),
    "no-hard-links": (KeyboardInterrupt(), ("replace",), False, 3, 6),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("way", list(WAYS))
def test_an_interrupted_write_leaves_the_outputs_as_they_were(existing, way, tmp_path, monkeypatch):
    """Model, data file and report land together: an interruption or error at any step (keeping
    a replaced file, renaming data, model, report into place) leaves all three as before, and no
    temporary file. It used to leave an orphan data file, or the model without its report."""
    failure, counted, links, new_steps, replacing_steps = WAYS[way]
    model = model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    if existing:
        quantize_into(out, model, bits=4)
    before = digests(out)
    steps = replacing_steps if existing else new_steps
    for at in range(1, steps + 1):
        Interrupt(monkeypatch, out, at, failure, counted, links)
        with pytest.raises(OutputError if isinstance(failure, OSError) else KeyboardInterrupt):
            quantize_into(out, model)
        assert digests(out) == before, at
        assert sorted(p.name for p in out.iterdir()) == sorted(before), at
    counter = Interrupt(monkeypatch, out, 0, failure, counted, links)
    quantize_into(out, model)
    assert counter.calls == steps
    assert digests(out) != before and sorted(p.name for p in out.iterdir()) == ["o.onnx", "o.onnx.data", "r.json"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_renames_is_deferred_then_undoes_them(signum, tmp_path, monkeypatch):
    """A signal delivered while the files are renamed into place does not stop the renames half
    way: they finish, are undone, and the run ends interrupted with the old outputs intact."""
    model = model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    quantize_into(out, model, bits=4)
    before = digests(out)
    # a shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored: give
    # this test Python's own SIGINT handler whatever launched it
    launched = signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    replace = os.replace

    def signalled(src, dst):
        replace(src, dst)
        if Path(dst).name == "o.onnx.data":  # between the data file's rename and the model's
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(files.os, "replace", signalled)
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_into(out, model)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    finally:
        signal.signal(signal.SIGINT, launched)
    assert digests(out) == before


def test_the_memory_a_refusal_asks_for_is_accepted(tmp_path):
    """"give at least 7.84 MB" used to be rounded down, so 7.84 was refused in turn."""
    from onnx_qubo.calibration.memory import readable
    from onnx_qubo.core.errors import OptionError

    assert readable(7_841_234) == "7.84 MB" and readable(7_841_234, up=True) == "7.85 MB"
    assert readable(999_600) == readable(999_600, up=True) == "1 MB" and readable(7_850_000, up=True) == "7.86 MB"
    model = model_dir(tmp_path)
    with pytest.raises(OptionError, match=r"give at least") as refused:
        runs.quantize(model, tmp_path / "o.onnx", solver="rtn", speed=False, max_memory=1e-6)
    amount, unit = str(refused.value).rsplit(" ", 2)[-2:]
    given = float(amount) * {"GB": 1, "MB": 1e-3, "KB": 1e-6}[unit]
    runs.quantize(model, tmp_path / "o.onnx", solver="rtn", speed=False, max_memory=given)
