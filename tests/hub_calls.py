"""What the hub tests watch: the calls our loader makes into huggingface_hub."""

from __future__ import annotations

import huggingface_hub


def record_hub_downloads(monkeypatch) -> list[dict]:
    """The keyword arguments of every hf_hub_download call from now on (the call still runs)."""
    calls: list[dict] = []
    real = huggingface_hub.hf_hub_download

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return calls
