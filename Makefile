# Shortcuts; `.ci/run` is what CI runs (the whole suite, slow tests included, the soak excluded).
.PHONY: test soak restart-loop

test:
	python3 -m pytest

# 10 minutes of mixed traffic with reloads and canary on; prints RSS / FD slopes (README, "Operations")
soak:
	STEADY_SOAK_REPORT=$${STEADY_SOAK_REPORT:-soak-report.json} python3 -m pytest -m soak -s -p no:cacheprovider tests/reliability/test_soak.py

# the restart test with more rounds (5 kills and restarts per round; CI runs 2 rounds)
restart-loop:
	STEADY_RESTART_ROUNDS=$${STEADY_RESTART_ROUNDS:-10} python3 -m pytest -s -p no:cacheprovider tests/reliability/test_restart.py -k restart_on
