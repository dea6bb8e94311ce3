"""Batch jobs for non-urgent work (> 100 items): `POST /batch/{task}` stores a job and queues
its chunks; `contentml batch worker` processes answer them with the task routes' own code
(`serving/backend/tasks.py`), loading the models in-process, so urgent single requests on the model
servers never wait behind batch work.

- **Queue.** huey (`Settings.batch_queue`): SQLite locally, Redis in the cluster; `urgent` jobs
  are dequeued before `bulk` ones (huey priorities), a failed chunk is retried with exponential
  backoff (`RETRIES`, `RETRY_DELAY_SECONDS` doubling). Messages are JSON (`JsonSerializer`),
  never pickles: writing to the queue does not run code in the workers.
- **Store.** Jobs, items, results and the dead-letter queue are tables in
  `Settings.backend_store` (SQLite locally, PostgreSQL in the cluster). A result is keyed by
  (job, item id) and written at most once; an item is in the results or in the dead letters,
  never both, so a job's counts are exact.
- **Nothing lost.** huey forgets a message once a worker takes it, so the store tracks each
  chunk: a worker claims it, heartbeats while alive, and marks it done. A chunk claimed by a
  worker whose heartbeat stopped (killed) is queued again by the other workers' reaper, and
  dead-lettered once it has been tried `RETRIES + 1` times; a chunk that sat queued but is no
  longer in the queue (a worker died between taking and claiming it) is queued again too.
- **Failures.** An item the model refuses (bad input) is dead-lettered at once with the reason;
  a chunk that fails otherwise is retried, then its unanswered items are dead-lettered with the
  last error. `contentml batch dlq retry` queues dead-lettered items again. A job ends `done`
  when every item is answered or dead-lettered and at least one was answered, `failed` when
  none was (with the reasons).

The modules, one job each: `schema` (the store's tables), `models` (the API's bodies and
answers), `store` (`JobStore`: jobs, chunks, results, dead letters, worker heartbeats),
`serializer` (huey's messages as JSON), `queue` (`BatchQueue`: submitting, running and reaping
chunks; the workers' `Heartbeat`) and `routes` (the `/batch` router).
"""
