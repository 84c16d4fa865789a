"""The results format, in one place: certification writes it, reports read it.

A results file is a TSV: one header line, then one row per image, each ended by a newline. Its
first columns are those of the reference scripts (`idx label predict radius correct time`), so
their analysis code reads it; counts and bounds follow. Beside it, `<file>.json` records the
settings it was written under.

What a results file guarantees (docs/DESIGN.md §8):
- **One writer.** A writer holds an exclusive lock (files.FileLock) on the results file itself
  for its whole run (WriterLock); a second process is refused at once, or waits (`wait=true`).
  The settings are checked again under the lock, when the file is opened for writing. A killed
  writer's lock is released by the OS, and no leftover file can be deleted to let a second writer
  in.
- **Identity by content.** The record holds every setting that changes the numbers
  (IDENTITY_KEYS): the statistics, the noise, the device type, the data set's content fingerprint
  and split, and the sha256 of every checkpoint (classifier, denoiser, rejector). A file is only
  extended under the same identity; anything else is refused before a row is written.
- **Append-only, whole rows.** Rows are flushed and fsynced as they are written; a torn last line
  (a kill mid-write) is dropped on resume; an unparsable or duplicated row is refused, naming the
  line; a results file without its record, or with a corrupt one, is refused.
- A results file that is empty (0 bytes: a lost disk write) beside its record is started again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from dsr_lightning.errors import ResultsError
from dsr_lightning.files import FileLock, Locked, atomic_write, write_error
from dsr_lightning.identity import sketch_difference, tolerance

log = logging.getLogger(__name__)

# the settings record's format (1: the first release, without content identity; 2: networks
# identified by their weights files' hashes; 3: by what each network is, `networks`)
FORMAT = 3

# The reference columns first, in their order, so existing analysis scripts read the file.
REFERENCE_COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]
CERTIFY_COLUMNS = REFERENCE_COLUMNS + [
    "n_A", "n_R", "n_B", "N", "pA_lower", "pAR_lower", "pB_upper", "c_hat"]
PREDICT_COLUMNS = ["idx", "label", "predict", "correct", "time", "n_A", "n_R", "n_B", "N"]
# mode=staged: the certificate of the stopping look (N its cumulative draws), that look's index,
# the draws spent (N0 + N), the target radius and whether the certificate reaches it
STAGED_COLUMNS = CERTIFY_COLUMNS + ["stage", "draws", "target_radius", "certified_at_target"]
# mode=attack: the clean certificate (predict radius correct), Algorithm 1 at x and at the
# attacked point x', whether the latter is right (0 on abstain), ‖x' − x‖₂ and the attack's ε
ATTACK_COLUMNS = REFERENCE_COLUMNS + [
    "clean_predict", "attacked_predict", "attacked_correct", "perturbation_norm", "epsilon"]
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS, "staged": STAGED_COLUMNS,
           "attack": ATTACK_COLUMNS}
INT_COLUMNS = {"idx", "label", "predict", "correct", "n_A", "n_R", "n_B", "N", "c_hat", "stage",
               "draws", "certified_at_target", "clean_predict", "attacked_predict",
               "attacked_correct"}
REQUIRED_COLUMNS = ("idx", "label", "predict", "radius", "correct")  # what reports need

# Everything that changes the numbers of a row: a file is only extended under the same values.
# SPEC_KEYS are the certification's own settings (tasks.CertificationSpec.record() writes exactly
# these; skip, max, batch and images_per_step choose which images and how fast, not their
# numbers); then what was certified: the system, the noise streams and device type, the data's
# content fingerprint, each network as built (`networks`: {role: {id, recipe}}, compared by id and
# by the probe outputs within identity.tolerance) and the threshold.
SPEC_KEYS = ("mode", "sigma", "N0", "N", "alpha", "bound", "split", "seed", "bf16",
             "channels_last", "compile", "radius", "stages", "stage_weights", "attack_steps",
             "attack_draws", "attack_step_size")
IDENTITY_KEYS = ("format", *SPEC_KEYS, "system", "noise", "device", "data", "networks",
                 "threshold", "attack")


def settings_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_settings(path: str | Path, required: bool = False) -> dict:
    """The settings record of results file `path` ({} if there is none and not `required`)."""
    rec = settings_path(path)
    if not rec.is_file():
        if required:
            raise ResultsError(f"{path} exists without its settings record {rec}: move it away or "
                               "choose another outfile=...")
        return {}
    try:
        settings = json.loads(rec.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{rec}: the settings record is corrupt ({e}); move the results file "
                           "and its record away, or choose another outfile=...") from None
    if not isinstance(settings, dict):
        raise ResultsError(f"{rec}: the settings record is not a JSON object; move the results "
                           "file and its record away, or choose another outfile=...")
    return settings


def _parse(value: str, column: str, where: str):
    try:
        if column in INT_COLUMNS:
            return int(value)
        return float(value)
    except ValueError:
        raise ResultsError(f"{where}: column {column} holds {value!r}, not a number") from None


def read_rows(path: str | Path, strict: bool = True) -> tuple[list[str], list[list], bool]:
    """(header, rows, torn): every whole row parsed. `strict` (our files): every known column must
    parse and every row have the header's length; otherwise (files of the reference scripts) only
    REQUIRED_COLUMNS must, the rest stay text. A last line without its newline is a row being
    written (or torn by a kill): not returned, `torn` is True. An unparsable row, or a second row
    of the same idx, raises ResultsError naming the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a results file (binary content, not tab-separated "
                           "text)") from None
    lines = text.split("\n")
    torn = lines[-1] != ""
    if not lines[0] or lines[0] == text and torn:
        raise ResultsError(f"{path}: no header line (an empty or torn file)")
    header = lines[0].split("\t")
    missing = [c for c in (REQUIRED_COLUMNS if not strict else ("idx",)) if c not in header]
    if missing:
        hint = " (mode=predict output? reports need mode=certify)" if missing == ["radius"] else ""
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}{hint}; found "
                           f"{', '.join(header)}")
    parse = set(header) if strict else set(REQUIRED_COLUMNS)
    rows, seen = [], {}
    for no, line in enumerate(lines[1:-1], start=2):
        where = f"{path}, line {no}"
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ResultsError(f"{where}: {len(cells)} fields for {len(header)} columns "
                               f"({line[:80]!r}); the file is damaged: move it away, or delete "
                               "that line to recompute the image")
        row = [_parse(v, c, where) if c in parse else v for v, c in zip(cells, header)]
        idx = row[header.index("idx")]
        if idx in seen:
            raise ResultsError(f"{where}: image idx {idx} appears again (first at line "
                               f"{seen[idx]}): a file written by two processes? Move it away, or "
                               "delete one of the lines")
        seen[idx] = no
        rows.append(row)
    return header, rows, torn


def read_table(path: str | Path) -> pd.DataFrame:
    """A results file as a DataFrame, one row per image (checked as in read_rows; files with a
    settings record strictly, others as the reference scripts write them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    strict = settings_path(path).is_file()
    header, rows, _ = read_rows(path, strict=strict)
    df = pd.DataFrame(rows, columns=header)
    for c in header:
        try:
            df[c] = df[c].astype(np.int64 if c in INT_COLUMNS else np.float64)
        except ValueError:  # a foreign file's text column (e.g. the reference scripts' time)
            if strict or c in REQUIRED_COLUMNS:
                raise
    return df


def fmt(v) -> str:
    """A cell as written. Floats are written exactly (the shortest text that reads back as the
    same float): a certified radius is never rounded up (0.49999951 is not written as 0.5)."""
    if isinstance(v, float | np.floating):
        return "nan" if np.isnan(v) else repr(float(v))
    return str(int(v)) if isinstance(v, np.integer | bool) else str(v)


def jsonable(value):
    """A settings value as the record stores it, in standard JSON: a non-finite float becomes
    the text 'inf', '-inf' or 'nan' (JSON has no such numbers), tuples become lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def network_ids(settings: dict) -> dict:
    """{role: id} of the networks a settings record names ({} for records before format 3)."""
    nets = settings.get("networks")
    return {r: n.get("id") for r, n in nets.items()} if isinstance(nets, dict) else {}


def identity_of(settings: dict, drop=()) -> dict:
    """The identity of a record (IDENTITY_KEYS, the networks by their ids; a record before format
    3 also by its weights files' hashes), without the keys in `drop` ('networks.rejector' drops
    one network): what reports group and merge on."""
    out = {k: settings.get(k) for k in IDENTITY_KEYS if k != "networks" and k not in drop}
    out["networks"] = {r: i for r, i in network_ids(settings).items()
                       if f"networks.{r}" not in drop and "networks" not in drop}
    for role in ("classifier", "denoiser", "rejector"):  # format 2: the weights files' hashes
        if settings.get(f"{role}_sha256") is not None and f"networks.{role}" not in drop:
            out[f"{role}_sha256"] = settings[f"{role}_sha256"]
    return jsonable(out)


def _network_diff(old, new) -> list[str]:
    """How two records' networks differ: another network (id), or the same recipe and weights
    computing other outputs now (the probe, within identity.tolerance)."""
    old, new = old or {}, new or {}
    out = []
    for role in sorted(set(old) | set(new)):
        a, b = old.get(role) or {}, new.get(role) or {}
        if a.get("id") != b.get("id"):
            out.append(f"networks.{role}: file {_named(a)} vs now {_named(b)}")
            continue
        pa, pb = (x.get("recipe", {}).get("probe") for x in (a, b))
        if pa and pb:
            diff = sketch_difference(pa["sketch"], pb["sketch"])
            tol = tolerance(pa.get("device"), pb.get("device"))
            if diff > tol:
                out.append(f"networks.{role}: the same recipe and weights give other outputs now "
                           f"(probe difference {diff:.3g} > {tol:g}: state outside its weights?)")
    return out


def _named(fp: dict) -> str:
    if not fp:
        return "none"
    recipe = fp.get("recipe") or {}
    return f"{recipe.get('name') or recipe.get('source')} #{fp.get('id')}"


def _identity_diff(old: dict, new: dict) -> list[str]:
    old, new = jsonable(old), jsonable(new)  # records of earlier releases may hold Infinity
    if old.get("format") != new.get("format"):
        return [f"format: file {old.get('format')!r} vs now {new.get('format')!r} (a file of an "
                "earlier release, whose networks are identified by their files, not by what they "
                "compute: it cannot be extended)"]
    out = [f"{k}: file {old.get(k)!r} vs now {new.get(k)!r}" for k in IDENTITY_KEYS
           if k != "networks" and old.get(k) != new.get(k)]
    return out + _network_diff(old.get("networks"), new.get("networks"))


class WriterLock:
    """The one-writer rule of a results file: the results file's own files.FileLock, held for the
    writer's whole run (the file is created empty if need be: an empty file is started again, and
    one this lock created and left empty is removed on release). A killed writer's lock is
    released by the OS; there is no lock file that could look stale, or be deleted to let a second
    writer in. `<file>.writer` says who holds it, for the message only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = Path(f"{self.path}.writer")
        self._lock = FileLock(self.path, create=True, error=ResultsError)
        self._created = False

    def prepare(self) -> None:
        """Create the folder and make sure it is writable, before any work is done."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.path.parent / f".{self.path.name}.probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ResultsError(f"cannot write the results file {self.path}: "
                               f"{e.strerror or e} ({e.filename or self.path.parent}); choose "
                               "another outdir=... or outfile=...") from None
        if self.path.is_dir():
            raise ResultsError(f"{self.path} is a folder, not a results file: choose another "
                               "outfile=...")

    def _holder(self) -> str:
        try:
            return self.info.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self, wait: bool = False, poll: float = 0.5) -> WriterLock:
        """Take the file for this process (held until release() or exit). Another holder: raise
        ResultsError, or with `wait` block until it is done."""
        self.prepare()
        self._created = not self.path.exists()
        try:
            self._lock.acquire(wait=wait, poll=poll, waiting=lambda: log.info(
                "waiting for %s to finish %s ...", self._holder(), self.path))
        except Locked:
            raise ResultsError(f"{self.path} is being written by {self._holder()}: one writer at "
                               "a time. Wait for it (or pass wait=true to wait here), or choose "
                               "another outfile=...") from None
        with suppress(OSError):
            self.info.write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        return self

    def release(self) -> None:
        if not self._lock.held:
            return
        with suppress(OSError):
            self.info.unlink()
        with suppress(OSError):  # created here and never written: leave nothing behind
            if self._created and self.path.stat().st_size == 0 and not settings_path(self.path).exists():
                self.path.unlink()
        self._lock.release()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ResultsFile:
    """A results file and its settings record (written by the holder of its WriterLock).

    `check()` reads the existing file under the identity rules and returns the indices done;
    `open()` creates it (the record first) or repairs a torn tail; `append()` writes whole rows.
    Shards of a multi-device run write `<file>.rank<r>` and the main process folds them in
    (`merge_parts`)."""

    def __init__(self, path: str | Path, settings: dict, columns: list[str]):
        self.path, self.settings, self.columns = Path(path), jsonable(settings), list(columns)
        self.meta = settings_path(self.path)

    # -- reading -----------------------------------------------------------------------------
    def check(self) -> set[int]:
        """Validate an existing file against the settings (writing nothing); the indices done."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()  # nothing, or a lost write of the header: start again
        old = read_settings(self.path, required=True)
        if diff := _identity_diff(old, self.settings):
            raise ResultsError(f"{self.path} was written with other settings ({'; '.join(diff)}). "
                               "Choose another outfile=... or restore the settings to resume it.")
        header, rows, _ = read_rows(self.path)
        if header != self.columns:
            raise ResultsError(f"{self.path}: its columns ({' '.join(header)}) are not this mode's; "
                               "choose another outfile=...")
        return {r[0] for r in rows}

    # -- writing -----------------------------------------------------------------------------
    def _write_record(self, meta: Path) -> None:
        record = (json.dumps(self.settings, indent=2, default=str, allow_nan=False) + "\n").encode()
        # a file is never without its (whole) settings
        atomic_write(meta, lambda f: f.write(record), "the settings record", ResultsError)

    def open(self) -> None:
        """Create the file (settings record first, atomically; then the header) or repair a torn
        last line; then rows are appended. A failing disk is one ResultsError, no temporary file
        left: a record without its header is a lost write, started again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write_record(self.meta)
            try:  # in place: the writer's flock is on this file's inode, which a rename would drop
                with open(self.path, "w") as f:
                    f.write("\t".join(self.columns) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                with suppress(OSError):  # a torn header: empty is a lost write, started again
                    os.truncate(self.path, 0)
                raise write_error(self.path, e, "the results file", ResultsError,
                                  kept="Nothing was written.") from None
        else:
            self._drop_torn_line(self.path)

    @staticmethod
    def _drop_torn_line(path: Path) -> None:
        data = path.read_bytes()
        if not data.endswith(b"\n"):  # truncate in place: a kill now cannot lose the whole rows
            os.truncate(path, data.rfind(b"\n") + 1)

    def append(self, rows: list[dict], path: Path | None = None) -> None:
        """Write whole rows, flushed and fsynced. A failed write (a full disk) is one
        ResultsError: the rows before it are kept, and a torn last line is dropped on resume."""
        target = path or self.path
        try:
            with open(target, "a") as f:
                for r in rows:
                    f.write("\t".join(fmt(r.get(c, "")) for c in self.columns) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise ResultsError(f"cannot append to {target}: {what}. The rows written before are "
                               "kept; free space and run the same command again to resume") from None

    def part(self, rank: int) -> Path:
        return Path(f"{self.path}.rank{rank}")

    def open_part(self, rank: int) -> Path:
        """The shard of rank `rank` of a multi-device run, ready for rows: it carries its own
        settings record (written before its first row), so a shard left by a killed run is folded
        in only under the same identity (`merge_parts`)."""
        part = self.part(rank)
        if part.exists() and part.stat().st_size:
            self._check_part(part)
        else:
            self._write_record(settings_path(part))
        return part

    def _check_part(self, part: Path) -> None:
        if not settings_path(part).is_file():
            raise ResultsError(f"{part}: a shard without its settings record (of an earlier "
                               "release, or not written here): it cannot be told to belong to "
                               f"{self.path}. Move it away, then run the same command again")
        old = read_settings(part, required=True)
        if diff := _identity_diff(old, self.settings):
            raise ResultsError(f"{part}: a shard of a run with other settings "
                               f"({'; '.join(diff)}): its rows do not belong to {self.path}. Move "
                               "it away, or restore the settings it was written with")

    def merge_parts(self) -> set[int]:
        """Fold shard files of a multi-device run into the results file, in index order (the
        settings are checked first, the file's and each shard's: a shard of other settings, or
        without a record, is refused); returns the indices the file then holds. Each shard's
        torn tail is dropped, and an image in two places is kept once."""
        parts = sorted(p for p in self.path.parent.glob(self.path.name + ".rank*")
                       if p.suffix != ".json" and ".tmp" not in p.name)
        done = self.check()
        if not parts:
            return done
        for p in parts:
            self._check_part(p)
        self.open()
        rows: dict[int, str] = {}
        for p in parts:
            for no, ln in enumerate(p.read_text().split("\n")[:-1], start=1):
                cells = ln.split("\t")
                if len(cells) != len(self.columns):
                    raise ResultsError(f"{p}, line {no}: {len(cells)} fields for "
                                       f"{len(self.columns)} columns: a damaged shard; move it away")
                idx = _parse(cells[0], "idx", f"{p}, line {no}")
                if idx not in done:
                    rows.setdefault(idx, ln)
        if rows:
            with open(self.path, "a") as f:
                f.write("".join(rows[i] + "\n" for i in sorted(rows)))
                f.flush()
                os.fsync(f.fileno())
        for p in parts:
            p.unlink()
            settings_path(p).unlink(missing_ok=True)
        return done | set(rows)
