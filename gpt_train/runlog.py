"""The run's own records in its run directory, written by rank 0, and the facade that feeds them and the dashboards.

    RUN/run.json        the run's id and creation time, written at the first start, read at every restart
    RUN/metrics.jsonl   one JSON object per logged step (step, loss, val_loss, lr, tokens, ...)
    RUN/events.jsonl    start, resume, preemption, finish: what `gpt-train status` reads
    RUN/samples.jsonl   the text samples taken during training (step, text)

Object stores cannot append, so the JSONL files are kept in memory and written whole on flush (at
each checkpoint and at exit; events also at once, they are rare); on local disk each record is also
appended at once. When a run resumes, metrics and samples after the resume point are dropped: those steps run
again, and a step is never counted twice. `read_jsonl` and `read_identity` are how anything else
(`gpt-train status`, `plot`) reads these files back.

One facade, `RunLog`, feeds the records and the dashboards (`gpt_train.dashboards`). The dashboards
never see a step twice: steps up to the highest one logged by an earlier attempt of the run are not
sent again after a resume (they were sent before; a resumed run retraces them exactly), so every
dashboard sees strictly increasing steps under one run id across all restarts.
"""

from __future__ import annotations

import json
import time
import uuid

from gpt_train import rundir
from gpt_train.dashboards import TensorBoardSink, WandbSink, dashboard_values, gpu_memory_gb, open_sinks
from gpt_train.errors import StorageError
from gpt_train.storage import Store


def read_jsonl(store: Store, name: str) -> list[dict]:
    """The records of a JSONL file of the run; none when it does not exist."""
    try:
        text = store.read_text(name)
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            out.append(record)
    return out


class JsonlFile:
    def __init__(self, store: Store, name: str, keep_up_to_step: int | None = None):
        self.store, self.name = store, name
        found = read_jsonl(store, name)
        # The highest step in the file as found, dropped records included.
        self.max_step = max((r["step"] for r in found if isinstance(r.get("step"), int)), default=0)
        self.records = [r for r in found if keep_up_to_step is None or r.get("step", 0) <= keep_up_to_step]
        self.flush()
        self._local = open(store.path(name), "a") if store.local else None

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self._local:
            self._local.write(json.dumps(record) + "\n")
            self._local.flush()

    def flush(self) -> None:
        if not getattr(self, "_local", None):  # local files are already complete
            self.store.write_text(self.name, "".join(json.dumps(r) + "\n" for r in self.records))

    def keep_up_to(self, step: int) -> None:
        """Drop the records of steps after `step` (a rollback redoes them)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        if self._local:
            self._local.close()
        self.store.write_text(self.name, "".join(json.dumps(r) + "\n" for r in self.records))
        if self._local:
            self._local = open(self.store.path(self.name), "a")

    def close(self) -> None:
        if self._local:
            self._local.close()
            self._local = None
        else:
            self.flush()


# -- the run's identity ----------------------------------------------------------------------------

def read_identity(store: Store) -> dict | None:
    """RUN/run.json as a dict, or None when it is missing or unreadable."""
    try:
        found = json.loads(store.read_text(rundir.RUN))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, StorageError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("id"), str) and found["id"] else None


def identify(store: Store, checkpoint_meta: dict | None = None) -> str:
    """The run's id: made and written to RUN/run.json at the first start, the same at every restart.

    A resume from a checkpoint takes the id the checkpoint carries (and repairs run.json if it is
    missing or differs, e.g. a run directory from before run.json existed). Without a checkpoint, a
    run.json next to an events log is a restart before the first checkpoint: the same run. A run.json
    without one is left over from a run whose records were removed (resume=none, overwrite=true):
    the new run gets a new id.
    """
    existing = read_identity(store)
    wanted = (checkpoint_meta or {}).get("run_id")
    if wanted:
        if not existing or existing["id"] != wanted:
            created = existing.get("created") if existing and existing["id"] == wanted else None
            _write_identity(store, wanted, created)
        return wanted
    if existing and store.exists(rundir.EVENTS):
        return existing["id"]
    run_id = uuid.uuid4().hex[:12]
    _write_identity(store, run_id, None)
    return run_id


def _write_identity(store: Store, run_id: str, created: str | None) -> None:
    record = {"id": run_id, "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_text(rundir.RUN, json.dumps(record, indent=2) + "\n")


# -- the facade ------------------------------------------------------------------------------------

class RunLog:
    """Every record of a run goes through here: metrics.jsonl, events.jsonl, wandb, TensorBoard."""

    identify = staticmethod(identify)  # the run id, before the log opens: RunLog.identify(store, checkpoint_meta)

    def __init__(self, store: Store, resume_step: int, config=None):
        self.store = store
        self.metrics = JsonlFile(store, rundir.METRICS, keep_up_to_step=resume_step)
        self.events = JsonlFile(store, rundir.EVENTS)
        self.samples = JsonlFile(store, rundir.SAMPLES, keep_up_to_step=resume_step)
        identity = read_identity(store)
        self.run_id = identity["id"] if identity else identify(store)
        # Steps up to here went to the dashboards in an earlier attempt: not sent twice.
        self.sent_through = self.metrics.max_step
        self.wandb: WandbSink | None = None
        self.tensorboard: TensorBoardSink | None = None
        if config is not None:
            rows = [[r["step"], r["text"]] for r in self.samples.records if "step" in r and "text" in r]
            self.wandb, self.tensorboard = open_sinks(store, config, self.run_id, resume_step, rows)

    def metric(self, **record) -> None:
        if "loss" in record and "gpu_mem_gb" not in record:
            mem = gpu_memory_gb()
            if mem is not None:
                record["gpu_mem_gb"] = mem
        self.metrics.append(record)
        step = record.get("step")
        if isinstance(step, int) and step > self.sent_through and (self.wandb or self.tensorboard):
            values = dashboard_values(record)
            if values:
                if self.wandb:
                    self.wandb.log(values, step)
                if self.tensorboard:
                    self.tensorboard.log(values, step)

    def sample(self, step: int, text: str) -> None:
        """A text sample: samples.jsonl, a table in wandb, a text panel in TensorBoard."""
        self.samples.append({"step": step, "text": text, "time": time.time()})
        if step > self.sent_through:
            if self.wandb:
                self.wandb.sample(step, text)
            if self.tensorboard:
                self.tensorboard.sample(step, text)

    def event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, "time": time.time(), **fields})
        if not self.store.local:  # rare, and what `status` reads: written at once
            try:
                self.events.flush()
            except StorageError as e:
                print(f"runlog: could not write events.jsonl now ({e}); it is written again at the next checkpoint", flush=True)

    def rewind(self, step: int) -> None:
        """Metrics and samples after `step` are about to be redone (a rollback): drop them."""
        self.metrics.keep_up_to(step)
        self.samples.keep_up_to(step)

    def flush(self) -> None:
        self.metrics.flush()
        self.events.flush()
        self.samples.flush()
        if self.tensorboard:
            self.tensorboard.flush()

    def close(self) -> None:
        self.metrics.close()
        self.events.close()
        self.samples.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.close()
