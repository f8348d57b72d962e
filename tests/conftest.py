import os

from hypothesis import HealthCheck, settings

# NOTE: "ci" bounds the run time of the suite; "dev" is quicker for local edits. Select with
# HYPOTHESIS_PROFILE (the .ci/run script sets ci).
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
