"""LONGSPEC's counters on SGLang's Prometheus endpoint (`--enable-metrics`, `GET /metrics`).

SGLang's scheduler processes write their metrics to the shared prometheus_client multiprocess
folder that the HTTP server exposes; counters created here, in the scheduler process of TP rank 0,
land there the same way. Names follow SGLang's `sglang:` prefix and vLLM's spec-decode counters:

  sglang:longspec_drafts_total{drafter}            verified drafts
  sglang:longspec_draft_tokens_total{drafter}      draft tokens verified
  sglang:longspec_accepted_tokens_total{drafter}   draft tokens accepted
  sglang:longspec_steps_total{kind}                decode steps: verify / plain (and, among
                                                   the plain ones, saturated: the load left no
                                                   draft budget)
  sglang:longspec_shape_drafts_total{shape}       verified drafts by shape: chain / tree
  sglang:longspec_refusals_total{reason}           drafts the router did not verify, by reason
  sglang:longspec_fallbacks_total{cause}           failures that turned requests plain, by cause
"""

from __future__ import annotations


class PrometheusCounters:
    def __init__(self):
        from prometheus_client import Counter

        def counter(name, doc, label):
            return Counter(f"sglang:longspec_{name}", doc, labelnames=[label])

        # SourceCounts field -> its counter
        self._by_source = {
            "drafts": counter("drafts", "LONGSPEC drafts verified.", "drafter"),
            "draft_tokens": counter("draft_tokens", "LONGSPEC draft tokens verified.", "drafter"),
            "accepted": counter("accepted_tokens", "LONGSPEC draft tokens accepted.", "drafter"),
        }
        self._shapes = counter("shape_drafts", "LONGSPEC drafts verified, by shape.", "shape")
        self._steps = counter("steps", "LONGSPEC decode steps by kind.", "kind")
        self._refusals = counter("refusals", "LONGSPEC drafts not verified, by reason.", "reason")
        self._fallbacks = counter("fallbacks", "LONGSPEC failures that turned requests to plain "
                                  "decoding, by cause.", "cause")
        self._last: dict = {}

    def _add(self, metric, key: tuple, label: str, value: float) -> None:
        delta = value - self._last.get(key, 0)
        if delta > 0:
            metric.labels(label).inc(delta)
            self._last[key] = value

    def update(self, counters, refusals) -> None:
        """Bring the exported counters up to the controller's (called after each decode step)."""
        for source, counts in counters.by_source.items():
            for field_name, metric in self._by_source.items():
                self._add(metric, ("src", field_name, source), source, getattr(counts, field_name))
        for shape, counts in counters.by_shape.items():
            self._add(self._shapes, ("shape", shape), shape, counts.drafts)
        self._add(self._steps, ("steps", "verify"), "verify", counters.verify_steps)
        self._add(self._steps, ("steps", "plain"), "plain", counters.plain_steps)
        self._add(self._steps, ("steps", "saturated"), "saturated", counters.saturated_steps)
        for reason, n in refusals.items():
            self._add(self._refusals, ("refusal", reason), reason, n)
        for cause, n in counters.fallbacks.items():
            self._add(self._fallbacks, ("fallback", cause), cause, n)
