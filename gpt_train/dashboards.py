"""The dashboards a run's metrics and samples are also sent to: Weights & Biases and TensorBoard.

    RUN/wandb/          Weights & Biases local files (logging.wandb != off)
    RUN/tensorboard/ID/ TensorBoard event files (logging.tensorboard=true)

Both are optional and imported lazily; `gpt_train.runlog.RunLog` decides what reaches them. wandb
runs on its own thread: its start-up, a slow or unreachable service, or a failure of any kind never
blocks the training loop; a failure is reported once and the run goes on without it.
"""

from __future__ import annotations

import math
import os
import queue
import re
import sys
import threading
from pathlib import Path

from gpt_train.errors import ConfigError, StorageError
from gpt_train.storage import Store

WANDB_INIT_TIMEOUT_S = 60.0  # unless WANDB_INIT_TIMEOUT says otherwise; it runs off the training thread
WANDB_CLOSE_TIMEOUT_S = 60.0  # the longest exit waits for wandb to finish its uploads


def _say(message: str) -> None:
    print(message, flush=True)


# metrics.jsonl key -> dashboard name. Keys not listed are not sent (step, time).
DASHBOARD_KEYS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu", "step_ms": "train/step_ms",
    "epoch": "train/epoch", "gpu_mem_gb": "train/gpu_mem_gb", "val_loss": "val/loss",
    "val_bpb": "val/bits_per_byte",
}


def dashboard_values(record: dict) -> dict[str, float]:
    out = {}
    for key, name in DASHBOARD_KEYS.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    if "val/loss" in out and out["val/loss"] < 50:
        out["val/perplexity"] = math.exp(out["val/loss"])
    return out


def _local_cache(run_url: str, what: str) -> Path:
    """A local folder for files a library can only write to local disk, when the run lives in an object store."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-train" / what
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", run_url).strip("_")


def _wandb_has_credentials() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (where `wandb login` puts it). The key itself is never read out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
        return bool(host and netrc.netrc(os.environ.get("NETRC")).authenticators(host))
    except Exception:
        return False


def wandb_mode(setting: str) -> str:
    """off | online | offline, from logging.wandb: auto means online when an API key is at hand."""
    if setting == "auto":
        return "online" if _wandb_has_credentials() else "offline"
    return setting


def _scrub(text: str) -> str:
    """An error message as it may be printed: never with the API key in it."""
    key = os.environ.get("WANDB_API_KEY")
    if key and len(key) >= 8:
        text = text.replace(key, "<WANDB_API_KEY>")
    return " ".join(text.split())[:300]


class WandbSink:
    """wandb on a thread of its own: the training loop only puts records on a queue."""

    def __init__(self, mode: str, local_dir: Path, run_id: str, project: str, name: str, config: dict,
                 remote_run: Store | None, samples: list[list] | None = None):
        self.mode, self.local_dir, self.run_id = mode, local_dir, run_id
        self.project, self.name, self.config = project, name, config
        self.remote_run = remote_run  # where to copy the offline files at the end, for a run in an object store
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.failed: str | None = None
        self.offline_dir: str | None = None
        self._samples: list[list] = list(samples or [])  # rows of earlier attempts: the table spans restarts
        self._thread = threading.Thread(target=self._work, name="wandb", daemon=True)
        self._thread.start()

    # called from the training thread: never blocks
    def log(self, values: dict, step: int) -> None:
        self.queue.put(("log", values, step))

    def sample(self, step: int, text: str) -> None:
        self.queue.put(("sample", text, step))

    def close(self, timeout: float = WANDB_CLOSE_TIMEOUT_S) -> None:
        self.queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            _say(f"wandb: still finishing after {timeout:.0f} s; exiting without waiting for it (the local files "
                 f"in {self.local_dir} can be uploaded later with `wandb sync`)")

    # the wandb thread
    def _fail(self, what: str, e: BaseException) -> None:
        if not self.failed:
            self.failed = f"{what}: {type(e).__name__}: {_scrub(str(e))}"
            _say(f"wandb: {self.failed}. Training goes on without wandb; metrics.jsonl has every record")

    def _start(self, wandb, mode: str):
        settings = {"silent": True}
        if not os.environ.get("WANDB_CONSOLE"):
            # The console log belongs to the job's log file; wandb's capture would hook every print of training.
            settings["console"] = "off"
        if not os.environ.get("WANDB_INIT_TIMEOUT"):
            settings["init_timeout"] = WANDB_INIT_TIMEOUT_S
        return wandb.init(project=self.project, name=self.name, id=self.run_id, resume="allow", mode=mode,
                          dir=str(self.local_dir), config=self.config, settings=wandb.Settings(**settings))

    def _work(self) -> None:
        run = None
        try:
            import wandb

            self.local_dir.mkdir(parents=True, exist_ok=True)
            try:
                run = self._start(wandb, self.mode)
            except Exception as e:
                if self.mode != "online":
                    raise
                # An unreachable service or a rejected key: keep the records locally, under the same id.
                _say(f"wandb: cannot start online ({type(e).__name__}: {_scrub(str(e))}); logging offline instead")
                self.mode = "offline"
                wandb.teardown()  # the failed run keeps its id "in use" until the service is restarted
                run = self._start(wandb, "offline")
            if self.mode == "offline":
                self.offline_dir = str(Path(run.dir).parent)
                _say(f"wandb: offline run {self.run_id} in {self.offline_dir}; upload it, with every earlier "
                     f"attempt, by `wandb sync {Path(self.offline_dir).parent}/offline-run-*-{self.run_id}`")
            else:
                _say(f"wandb: run {self.run_id} at {run.url or '(url not known yet)'}")
        except Exception as e:
            self._fail("could not start", e)
            run = None
        while True:
            item = self.queue.get()
            if item is None:
                break
            if run is None:
                continue  # drained, so that the queue does not grow
            kind, payload, step = item
            try:
                if kind == "log":
                    run.log(payload, step=step)
                else:
                    import wandb

                    self._samples.append([step, payload])
                    # A table is immutable once logged: each sample logs the whole table so far.
                    run.log({"samples": wandb.Table(columns=["step", "text"], data=list(self._samples))}, step=step)
            except Exception as e:
                self._fail("logging failed", e)
                run = None
        if run is not None:
            try:
                run.finish()
            except Exception as e:
                self._fail("finishing failed", e)
        if self.remote_run is not None and self.offline_dir:
            self._copy_offline_files()

    def _copy_offline_files(self) -> None:
        """An offline run of a run in an object store: its files go next to the run's other records."""
        root = Path(self.offline_dir)
        try:
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    self.remote_run.write_bytes(f"wandb/{root.name}/{path.relative_to(root).as_posix()}",
                                                path.read_bytes())
            _say(f"wandb: offline files copied to {self.remote_run.url}/wandb/{root.name}")
        except Exception as e:
            _say(f"wandb: could not copy the offline files to {self.remote_run.url}/wandb ({type(e).__name__}: "
                 f"{_scrub(str(e))}); they stay in {root}")


class TensorBoardSink:
    """Event files in RUN/tensorboard/ID/; for a run in an object store, written locally and copied at each flush."""

    def __init__(self, store: Store, run_id: str, config_text: str, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        self.store, self.rel = store, f"tensorboard/{run_id}"
        if store.local:
            self.local_dir = Path(store.path(self.rel))
        else:
            self.local_dir = _local_cache(store.url, "tensorboard") / run_id
            _say(f"tensorboard: run_dir is not on local disk: event files are written to {self.local_dir} "
                 f"and copied to {store.url}/{self.rel} at each checkpoint")
        self.writer = SummaryWriter(log_dir=str(self.local_dir))
        self.writer.add_text("config", "```\n" + config_text + "\n```", step)

    def log(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def sample(self, step: int, text: str) -> None:
        self.writer.add_text("samples", "```\n" + text + "\n```", step)

    def flush(self) -> None:
        self.writer.flush()
        if not self.store.local:
            try:
                for path in self.local_dir.iterdir():
                    if path.is_file():
                        self.store.write_bytes(f"{self.rel}/{path.name}", path.read_bytes())
            except (OSError, StorageError) as e:
                _say(f"tensorboard: could not copy event files to {self.store.url}/{self.rel}: {e}")

    def close(self) -> None:
        self.flush()
        self.writer.close()


def open_sinks(store: Store, cfg, run_id: str, resume_step: int,
               samples: list[list]) -> tuple[WandbSink | None, TensorBoardSink | None]:
    """The dashboards `cfg.logging` asks for; `samples` are the (step, text) rows of earlier attempts."""
    from gpt_train.config import dump, to_dict

    lc = cfg.logging
    tensorboard = TensorBoardSink(store, run_id, dump(cfg).rstrip(), resume_step) if lc.tensorboard else None
    mode = wandb_mode(lc.wandb)
    if mode == "off":
        return None, tensorboard
    if store.local:
        local_dir = Path(store.path())
    else:
        local_dir = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else _local_cache(store.url, "wandb")
        _say(f"wandb: run_dir is not on local disk: wandb's files are written under {local_dir}/wandb"
             + (" and the offline run is copied to the run directory at the end" if mode == "offline" else ""))
    name = lc.name or store.url.rstrip("/").rsplit("/", 1)[-1]
    config = {**to_dict(cfg), "run_id": run_id}
    wandb = WandbSink(mode, local_dir, run_id, lc.project, name, config, None if store.local else store, samples)
    return wandb, tensorboard


def gpu_memory_gb() -> float | None:
    """Peak GPU memory allocated by this process, when it has used a GPU (torch is not imported for this)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except Exception:
        pass
    return None
