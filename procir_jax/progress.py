"""Progress of long work on this process, logged with its rate and ETA."""

from __future__ import annotations

import dataclasses
import time

from absl import logging

LOG_EVERY_S = 10.0


@dataclasses.dataclass
class Progress:
  """Counts `done` of `total` and logs "<what>: done/total <unit> on this process
  (rate/s, ETA)" at most every LOG_EVERY_S seconds, or when forced."""

  what: str  # e.g. "Embedding validation"
  unit: str  # e.g. "products"
  total: int
  start: float = dataclasses.field(default_factory=time.perf_counter)
  done: int = 0
  last_log: float = dataclasses.field(default_factory=time.perf_counter)

  def log(self, note: str = "", force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last_log < LOG_EVERY_S:
      return
    self.last_log = now
    rate = self.done / max(now - self.start, 1e-9)
    logging.info("%s: %d/%d %s on this process (%.1f/s, ETA %.0fs)%s", self.what,
                 self.done, self.total, self.unit, rate,
                 (self.total - self.done) / max(rate, 1e-9), note)
