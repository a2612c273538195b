"""Batch quantization: every (model, width) pair of a model zoo is one independent, resumable job.

``plan_jobs`` turns a directory of ``*.onnx`` files (models bwacal wrote are left out), one model
file or a TOML manifest into ``Job``s; ``run_job`` runs one (calibrate, write the ONNX, then the
JSON report, each atomically) and returns its summary row; ``run_jobs`` runs many on a local process
pool or a Dask cluster and yields the rows as the jobs finish; ``write_summary`` writes the
Markdown, CSV and JSON tables and the plot. Rows hold accuracies and drops as fractions.

A job is skipped when its output and report exist and the report carries the job's key: a hash of
the model, calibration and evaluation bytes, the options, the format and the bwacal version.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from bwacal import __version__
from bwacal.calibrate import CalibrationOptions
from bwacal.config import CONFIG_KEYS, check_types, option_overrides, read_toml, renamed
from bwacal.errors import BwacalError
from bwacal.export import size_change
from bwacal.files import JSON_SCHEMA, file_sha256

FORMATS = ("fake", "packed")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
SUMMARY_COLUMNS = ("model", "width", "act_bits", "method", "start", "fp", "uniform", "bwa", "drop", "agreement",
                   "size_ratio", "avg_bits", "size_bytes", "avg_bits_budget", "size_budget", "seconds", "status", "error")

# a [[model]] of a manifest: the calibration options and files of a --config file (bwacal/config.py),
# the model's path and its name
_MODEL_KEYS = CONFIG_KEYS | {"path", "name"}


@dataclass(frozen=True)
class Job:
    """One model at one weight width: inputs, options, outputs and the key that decides resume."""

    name: str
    model: Path
    calib: Path
    eval: Path | None
    options: CalibrationOptions
    fmt: str
    output: Path
    report: Path
    key: str
    threads: int | None = None  # numba threads for the run; the executor sets it

    @property
    def width(self) -> str:
        """``W3`` or ``W3A8``; for mixed precision ``avg2.5`` or ``0.05MB`` (``A8`` after it likewise)."""
        act = self.options.act_bits
        return width_label(self.options.bits, self.options.avg_bits, self.options.size_budget) + (f"A{act}" if act else "")


def width_label(bits: int, avg_bits: float | None = None, size_budget: float | None = None) -> str:
    """``W3``; a mixed-precision job's budget instead: ``avg2.5`` or ``0.05MB``."""
    if avg_bits is not None:
        return f"avg{avg_bits:g}"
    if size_budget is not None:
        return f"{size_budget:g}MB"
    return f"W{bits}"


def output_name(name: str, bits: int, act_bits: int | None, avg_bits: float | None = None,
                size_budget: float | None = None) -> str:
    """``<name>.w<bits>[a<act_bits>].onnx``, as ``bwacal calibrate`` names its default output; a
    mixed-precision job's ``<name>.avg2.5[a<act_bits>].onnx`` or ``<name>.0.05mb[...].onnx``."""
    return f"{name}." + width_label(bits, avg_bits, size_budget).lower() + (f"a{act_bits}" if act_bits else "") + ".onnx"


def written_by_bwacal(path) -> bool:
    """Whether the ONNX file at ``path`` is a model bwacal wrote (it carries ``bwacal_version`` metadata)."""
    from bwacal.onnx_io import read_metadata

    return "bwacal_version" in read_metadata(path)


def plan_jobs(source, bits: Iterable[int], outdir, *, calib=None, eval_path=None,
              options: CalibrationOptions | None = None, fmt: str = "fake", log=None,
              avg_bits: Iterable[float] = (), size_budgets: Iterable[float] = ()) -> list[Job]:
    """The jobs for ``source``: a directory (every ``*.onnx`` but those bwacal wrote, sharing ``calib``
    and ``eval_path``), one ``.onnx`` model, or a TOML manifest (see README, "Batch quantization").

    ``bits``, ``options`` and ``fmt`` are the defaults a manifest entry may override; ``avg_bits`` and
    ``size_budgets`` add a mixed-precision job per budget (a manifest's ``avg_bits`` and ``size_budget``,
    a number or a list, likewise); ``log(message)``
    hears which models were left out. Raises ``BwacalError`` naming the file and the problem for a bad
    source, manifest or option, or a model bwacal already quantized.
    """
    source, outdir = Path(source), Path(outdir)
    base = options or CalibrationOptions()
    say = log or (lambda message: None)
    if source.is_dir() or source.suffix.lower() == ".onnx":
        if source.is_dir():
            if outdir.resolve() == source.resolve():
                raise BwacalError(f"{outdir}: the output directory is the source directory; choose another with -o")
            found = sorted(source.glob("*.onnx"))
            if not found:
                raise BwacalError(f"{source}: no *.onnx files in the directory")
            models = [m for m in found if not written_by_bwacal(m)]
            for m in found:
                if m not in models:
                    say(f"skipped {m}: bwacal wrote it (it carries bwacal's metadata); it is not quantized again")
            if not models:
                raise BwacalError(f"{source}: every *.onnx in it was written by bwacal; nothing to quantize")
        elif not source.is_file():
            raise BwacalError(f"{source}: no such file or directory")
        else:
            models = [source]
        if calib is None:
            raise BwacalError(f"{source}: a model or directory source needs --calib (shared by every model)")
        specs = [{"path": m, "name": m.stem, "calib": Path(calib), "eval": _opt_path(eval_path),
                  "bits": list(bits), "format": fmt, "options": base, "avg_bits": list(avg_bits),
                  "size_budget": list(size_budgets)} for m in models]
        where = str(source)
    elif source.is_file():
        specs = _read_manifest(source, list(bits), calib, eval_path, base, fmt, list(avg_bits), list(size_budgets))
        where = str(source)
    else:
        raise BwacalError(f"{source}: no such file or directory")

    hashes: dict[Path, str] = {}
    jobs, owners = [], {}
    for spec in specs:
        label = f"{where}: model '{spec['name']}'"
        for kind, what in (("path", "model"), ("calib", "calibration"), ("eval", "evaluation")):
            if spec[kind] is not None and not Path(spec[kind]).is_file():
                raise BwacalError(f"{label}: {what} file {spec[kind]} does not exist")
        if spec["calib"] is None:
            raise BwacalError(f"{label}: no calibration file (give 'calib' in the manifest or --calib)")
        if written_by_bwacal(spec["path"]):
            raise BwacalError(f"{label}: {spec['path']} was written by bwacal (it carries bwacal's metadata); "
                              "quantize the full-precision model instead")
        if spec["format"] not in FORMATS:
            raise BwacalError(f"{label}: format must be one of {', '.join(FORMATS)}; got {spec['format']!r}")
        if not spec["bits"] and not spec["avg_bits"] and not spec["size_budget"]:
            raise BwacalError(f"{label}: no bit widths")
        settings = [replace(spec["options"], bits=width) for width in spec["bits"]]
        settings += [replace(spec["options"], avg_bits=float(b)) for b in spec["avg_bits"]]
        settings += [replace(spec["options"], size_budget=float(b)) for b in spec["size_budget"]]
        for opts in settings:
            try:
                opts.validate()
            except BwacalError as exc:
                raise BwacalError(f"{label}: {exc}") from None
            out = outdir / output_name(spec["name"], opts.bits, opts.act_bits, opts.avg_bits, opts.size_budget)
            if out in owners:
                raise BwacalError(f"{label}: output {out.name} clashes with model '{owners[out]}'; "
                                  "give one of them another 'name'")
            owners[out] = spec["name"]
            key = job_key(spec["path"], spec["calib"], spec["eval"], opts, spec["format"], hashes)
            jobs.append(Job(spec["name"], Path(spec["path"]), Path(spec["calib"]), _opt_path(spec["eval"]),
                            opts, spec["format"], out, out.with_suffix(".json"), key))
    return jobs


def job_key(model, calib, eval_path, options: CalibrationOptions, fmt: str, cache: dict | None = None) -> str:
    """SHA-256 over the input files' hashes, the options, the format and the bwacal version."""
    cache = {} if cache is None else cache

    def digest(path):
        if path is None:
            return None
        path = Path(path).resolve()
        if path not in cache:
            cache[path] = file_sha256(path)
        return cache[path]

    record = {"model": digest(model), "calib": digest(calib), "eval": digest(eval_path),
              "options": asdict(options), "format": fmt, "bwacal": __version__}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _opt_path(p):
    return None if p is None else Path(p)


def _read_manifest(path: Path, bits, calib, eval_path, base: CalibrationOptions, fmt, avg_bits=(),
                   size_budgets=()) -> list[dict]:
    doc = read_toml(path)
    unknown = set(doc) - {"defaults", "model"}
    if unknown:
        raise BwacalError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (expected [defaults] and [[model]])")
    defaults = doc.get("defaults", {})
    entries = doc.get("model")
    if not isinstance(defaults, dict):
        raise BwacalError(f"{path}: 'defaults' must be a table")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise BwacalError(f"{path}: no models; list each as a [[model]] table with a 'path'")
    if "path" in defaults:
        raise BwacalError(f"{path}: 'path' belongs in each [[model]], not in [defaults]")
    root = path.parent
    specs = []
    defaults = renamed(defaults, f"{path}: [defaults]")
    for i, entry in enumerate(entries, 1):
        label = f"{path}: model {i}" + (f" ({entry['path']!r})" if isinstance(entry.get("path"), str) else "")
        merged = {**defaults, **renamed(entry, label)}
        widths = merged.pop("bits", bits)  # a manifest's bits may be a list of widths
        budgets = {key: _numbers(merged.pop(key, given), label, key)
                   for key, given in (("avg_bits", avg_bits), ("size_budget", size_budgets))}
        check_types(merged, label, _MODEL_KEYS)
        if not isinstance(merged.get("path"), str) or not isinstance(merged.get("name", ""), str):
            raise BwacalError(f"{label}: 'path' (the ONNX model, relative to the manifest) is required, "
                              "'name' must be a string")
        widths = [widths] if isinstance(widths, int) and not isinstance(widths, bool) else widths
        if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise BwacalError(f"{label}: 'bits' must be an integer or a list of integers, got {widths!r}")
        model = root / merged["path"]
        specs.append({
            "path": model, "name": merged.get("name", model.stem),
            "calib": root / merged["calib"] if "calib" in merged else _opt_path(calib),
            "eval": root / merged["data"] if "data" in merged else _opt_path(eval_path),
            "bits": widths, "format": merged.get("format", fmt), "options": replace(base, **option_overrides(merged)),
            **budgets,
        })
    return specs


def _numbers(value, label, key) -> list:
    """A manifest's number or list of numbers as a list."""
    value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
        raise BwacalError(f"{label}: {key!r} must be a number or a list of numbers, got {value!r}")
    return list(value)


# ---- one job --------------------------------------------------------------------------------------


def run_job(job: Job) -> dict:
    """Run one job (or skip it when its finished outputs match its key); never raises.

    Returns the summary row: accuracies as fractions, ``drop`` = FP - calibrated, ``uniform`` the
    uniform grid fitting started from (``start``), ``status`` ok, skipped or failed, and ``error``
    (one line) for a failed job.
    """
    from bwacal.calibrate import calibrate
    from bwacal.export import write_quantized
    from bwacal.files import write_bytes_atomically

    started = time.perf_counter()
    try:
        done = finished_report(job)
        if done is not None:
            return summary_row(job, done, "skipped")
        if job.threads:
            set_threads(job.threads)
        # a report left from other options must not vouch for the output about to be replaced
        job.report.unlink(missing_ok=True)
        cal = calibrate(job.model, job.calib, job.options, eval_path=job.eval)
        size = write_quantized(cal.net, cal.report, job.output, job.fmt)
        report = {"schema": JSON_SCHEMA, **cal.report}
        report.update({"output": str(job.output), "format": job.fmt, "size_bytes": size,
                       "input_size_bytes": job.model.stat().st_size,
                       "size_ratio": job.model.stat().st_size / size, "output_sha256": file_sha256(job.output),
                       "batch_key": job.key, "batch_seconds": time.perf_counter() - started})
        write_bytes_atomically(job.report, (json.dumps(report, indent=1) + "\n").encode())
        return summary_row(job, report, "ok")
    except Exception as exc:  # noqa: BLE001  (one job's failure is a row, not the end of the batch)
        return failed_row(job, exc, time.perf_counter() - started)


def finished_report(job: Job) -> dict | None:
    """The job's report when its output and report exist, the key matches and the output is intact."""
    if not (job.output.is_file() and job.report.is_file()):
        return None
    try:
        report = json.loads(job.report.read_text())
    except (OSError, ValueError):
        return None
    if report.get("batch_key") != job.key or report.get("output_sha256") != file_sha256(job.output):
        return None
    return report


def summary_row(job: Job, report: dict, status: str) -> dict:
    acc = report["accuracy"]

    def frac(v):
        return None if v is None else round(v, 6)

    method = report.get("method", "bwa")
    start = report.get("start", "mse")
    # the "bwa" column holds the calibrated network's top-1, whichever method calibrated it; "uniform"
    # the grid it started from, so the two columns show what fitting gained
    fp, bwa = frac(acc.get("fp")), frac(acc.get(method))
    return {"model": job.name, "width": job.options.bits, "act_bits": job.options.act_bits, "method": method,
            "start": start, "fp": fp, "uniform": frac(acc.get(f"uniform_{start}")), "bwa": bwa,
            "drop": None if fp is None or bwa is None else round(fp - bwa, 6),
            "agreement": frac((report.get("agreement") or {}).get(method)),
            "size_ratio": round(report["size_ratio"], 4),
            # mixed precision: the average weight bits, the size --size-budget counts, and the budget asked for
            "avg_bits": _round(report.get("avg_weight_bits")), "size_bytes": _round(report.get("quantized_size_bytes")),
            "avg_bits_budget": report["options"].get("avg_bits"), "size_budget": report["options"].get("size_budget"),
            "seconds": round(report["batch_seconds"], 3), "status": status, "error": None, "output": str(job.output)}


def _round(value, digits=4):
    return None if value is None else round(value, digits)


def failed_row(job: Job, exc: BaseException, seconds: float | None = None) -> dict:
    if isinstance(exc, BwacalError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}".rstrip(": ")
    lines = message.strip().splitlines()
    return {"model": job.name, "width": job.options.bits, "act_bits": job.options.act_bits,
            "method": job.options.method, "start": None, "fp": None,
            "uniform": None, "bwa": None, "drop": None, "agreement": None, "size_ratio": None, "avg_bits": None,
            "size_bytes": None, "avg_bits_budget": job.options.avg_bits, "size_budget": job.options.size_budget,
            "seconds": None if seconds is None else round(seconds, 3), "status": "failed",
            "error": lines[0] if lines else type(exc).__name__, "output": str(job.output)}


def set_threads(threads: int):
    """Numba threads for the calling thread (numba's setting is per thread), capped at its pool size."""
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


# ---- executors ------------------------------------------------------------------------------------


def local_layout(n_jobs: int, workers: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) so that workers x threads <= cores."""
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, n_jobs))
    return workers, max(1, cores // workers)


def run_jobs(jobs: list[Job], workers: int | None = None, scheduler: str | None = None) -> Iterator[tuple[Job, dict]]:
    """Run ``jobs`` and yield ``(job, row)`` as each finishes.

    Locally on a process pool of ``workers`` (default: one per core; one worker runs in this
    process), or on the Dask cluster whose scheduler is at ``scheduler`` (``tcp://HOST:8786``).
    Finished jobs are yielded first, as skipped, without reaching a worker.
    """
    pending = []
    for job in jobs:  # finished jobs need no worker (run_job checks again, for outputs racing in)
        report = finished_report(job)
        if report is not None:
            yield job, summary_row(job, report, "skipped")
        else:
            pending.append(job)
    if pending:
        yield from (_run_dask(pending, scheduler) if scheduler else _run_local(pending, workers))


def _run_local(jobs, workers):
    workers, threads = local_layout(len(jobs), workers)
    if workers == 1:
        for job in jobs:
            yield job, run_job(replace(job, threads=threads))
        return
    with local_pool(workers, threads) as pool:
        # NOTE: the workers are spawned by submit; started with SIGINT ignored, a Ctrl-C in the terminal
        # reaches only this process, which stops them (local_pool), instead of each printing a traceback
        with _sigint_ignored():
            futures = {pool.submit(_run_in_worker, replace(job, threads=threads)): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], _result(future, futures[future])


@contextmanager
def local_pool(workers: int, threads: int):
    """A spawn-started process pool whose workers each run BLAS and numba on ``threads`` threads.

    Leaving it on an exception (Ctrl-C, SIGTERM) stops the workers at once: queued jobs are
    cancelled, running ones are ended (SIGTERM, which a worker turns into KeyboardInterrupt so its
    atomic writes remove their temporary files; SIGKILL after a grace period), and nothing is waited for.
    """
    # spawned workers inherit the environment, so BLAS and numba size their pools before they load
    # (workers are spawned as jobs are submitted, so the environment stays set while the pool lives)
    with _environment({name: str(threads) for name in THREAD_VARIABLES}):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
        try:
            yield pool
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown(wait=True)


STOP_GRACE_SECONDS = 3.0


def _stop(pool: ProcessPoolExecutor):
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


@contextmanager
def _sigint_ignored():
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_in_worker(job: Job) -> dict:
    """``run_job`` in a pool worker; stopped (SIGTERM, as KeyboardInterrupt), the worker exits once
    the interrupt has unwound (removing any temporary file) instead of taking the next queued job."""
    try:
        return run_job(job)
    except KeyboardInterrupt:
        os._exit(130)


def _init_worker(threads: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupted)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    set_threads(threads)


@contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _result(future, job) -> dict:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001  (the worker died: BrokenProcessPool, KilledWorker)
        return failed_row(job, exc)


def _run_dask(jobs, scheduler):
    try:
        from distributed import Client, as_completed as dask_completed
    except ImportError:
        raise BwacalError("--scheduler needs Dask's distributed: pip install 'bwacal[cluster]'") from None
    try:
        client = Client(scheduler, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise BwacalError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        host_threads = {}
        for info in client.scheduler_info(n_workers=-1)["workers"].values():
            host_threads[info["host"]] = host_threads.get(info["host"], 0) + info["nthreads"]
        futures = {client.submit(_run_on_dask_worker, job, host_threads, pure=False): job for job in jobs}
        try:
            for future in dask_completed(futures, loop=client.loop):
                yield futures[future], _result(future, futures[future])
        finally:
            client.cancel(list(futures))


def _run_on_dask_worker(job: Job, host_threads: dict) -> dict:
    """Give the task its share of the host's cores: cores // (Dask threads on this host)."""
    from urllib.parse import urlsplit

    from distributed import get_worker

    host = urlsplit(get_worker().address).hostname
    threads = max(1, (os.cpu_count() or 1) // host_threads.get(host, os.cpu_count() or 1))
    return run_job(replace(job, threads=threads))


# ---- summary --------------------------------------------------------------------------------------


def write_summary(rows: list[dict], outdir, meta: dict | None = None) -> list[Path]:
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` (and ``summary.png`` when matplotlib is
    installed) into ``outdir``, each atomically; returns the paths written."""
    from bwacal.files import write_bytes_atomically

    outdir = Path(outdir)
    written = []
    doc = {"schema": JSON_SCHEMA, "bwacal_version": __version__, **(meta or {}),
           "units": "accuracies and drop as fractions (0.9175 is 91.75%)", "jobs": rows}
    for name, data in (("summary.md", summary_markdown(rows).encode()), ("summary.csv", _csv(rows).encode()),
                       ("summary.json", (json.dumps(doc, indent=1) + "\n").encode())):
        write_bytes_atomically(outdir / name, data)
        written.append(outdir / name)
    png = _plot(rows)
    if png is not None:
        write_bytes_atomically(outdir / "summary.png", png)
        written.append(outdir / "summary.png")
    return written


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def summary_markdown(rows: list[dict]) -> str:
    """The summary table in Markdown: accuracies and drops in percent / points."""
    lines = ["| model | width | method | FP | uniform (start) | calibrated | drop | size | seconds | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        width = (width_label(r["width"], r.get("avg_bits_budget"), r.get("size_budget"))
                 + (f"A{r['act_bits']}" if r["act_bits"] else ""))
        uniform = _pct(r["uniform"]) + (f" ({r['start']})" if r.get("start") and r["uniform"] is not None else "")
        size = "" if r["size_ratio"] is None else size_change(r["size_ratio"])
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['model']} | {width} | {r.get('method', 'bwa')} | {_pct(r['fp'])} | {uniform} | "
                     f"{_pct(r['bwa'])} | {_pct(r['drop'])} | {size} | {seconds} | {r['status']} |")
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "Failed:"]
        lines += [f"- {r['model']} {width_label(r['width'], r.get('avg_bits_budget'), r.get('size_budget'))}: "
                  f"{r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plot(rows: list[dict]) -> bytes | None:
    """The summary plot (``bwacal.plot.plot_summary``); None without matplotlib or without accuracies."""
    from bwacal.plot import plot_summary

    try:
        return plot_summary(rows)
    except BwacalError:  # matplotlib, an optional extra, is not installed
        return None
