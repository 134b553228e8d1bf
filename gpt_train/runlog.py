"""The run's own records, written by rank 0 into the run directory.

    RUN/metrics.jsonl   one JSON object per logged step (step, loss, val_loss, lr, tokens, ...)
    RUN/events.jsonl    start, resume, preemption, finish: what `gpt-train status` reads

Object stores cannot append, so both files are kept in memory and written whole on flush (at
each checkpoint and at exit); on local disk each record is also appended at once. When a run
resumes, metrics after the resume point are dropped: those steps run again, and a step is never
counted twice.
"""

from __future__ import annotations

import json
import time

from gpt_train.storage import Store


class JsonlFile:
    def __init__(self, store: Store, name: str, keep_up_to_step: int | None = None):
        self.store, self.name = store, name
        self.records: list[dict] = []
        if store.exists(name):
            for line in store.read_text(name).splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if keep_up_to_step is None or record.get("step", 0) <= keep_up_to_step:
                    self.records.append(record)
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

    def close(self) -> None:
        if self._local:
            self._local.close()
            self._local = None
        else:
            self.flush()


class RunLog:
    def __init__(self, store: Store, resume_step: int):
        self.metrics = JsonlFile(store, "metrics.jsonl", keep_up_to_step=resume_step)
        self.events = JsonlFile(store, "events.jsonl")

    def metric(self, **record) -> None:
        self.metrics.append(record)

    def event(self, kind: str, **fields) -> None:
        self.events.append({"event": kind, "time": time.time(), **fields})

    def flush(self) -> None:
        self.metrics.flush()
        self.events.flush()

    def close(self) -> None:
        self.metrics.close()
        self.events.close()
