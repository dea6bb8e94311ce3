"""Load and soak tests of `contentml serve` with locust (`make loadtest`, not part of `make test`).

- `traffic.py`: the trend requests the simulated users send and how an answer is judged
  (no locust import, so unit tests can use it without gevent patching their process).
- `locustfile.py`: the locust user; also runs on its own with `locust -f`.
- `state.py`: the registry state the scenarios need (a trend champion, a second version).
- `run.py` (`python -m tests.load`): starts the server and runs the scenarios.
"""
