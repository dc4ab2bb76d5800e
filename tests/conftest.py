"""Hypothesis profiles: "dev" by default, "ci" (derandomised) on CI.

CI sets CI=true and gets the "ci" profile: the examples are derived from each test's own
source, not from a random seed or the local example database, so a red CI run reproduces
locally with ``CI=true pytest tests/test_properties.py`` (and prints the failing example's
blob for ``@reproduce_failure``). HYPOTHESIS_PROFILE=<name> picks a profile explicitly;
pytest's ``--hypothesis-profile`` still overrides both.
"""

from __future__ import annotations

import os

from hypothesis import settings

# Both start from Hypothesis' own defaults, not from whatever profile is loaded: Hypothesis
# loads its built-in "ci" profile by itself wherever a CI variable is set (even CI=false),
# which "dev" must not inherit. deadline=None in both: a first example pays for torch's lazy
# initialisation and per-shape kernel selection, which makes per-example timings
# meaningless on a shared CPU.
_DEFAULT = settings.get_profile("default")
settings.register_profile(
    "dev", _DEFAULT, max_examples=100, derandomize=False, deadline=None, print_blob=False
)
settings.register_profile(
    "ci",
    _DEFAULT,
    derandomize=True,
    database=None,  # replaying local failures first would make runs differ between machines
    max_examples=100,
    deadline=None,
    print_blob=True,
)


def _profile() -> str:
    explicit = os.environ.get("HYPOTHESIS_PROFILE")
    if explicit:
        return explicit
    on_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return "ci" if on_ci else "dev"


settings.load_profile(_profile())
