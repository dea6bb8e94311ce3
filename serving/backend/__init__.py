"""The backend API: the task routes with their SLAs (`tasks`), batch jobs (`batch`), the cost
ledger (`costs`) and CrisisManager's channel routes (`channels`)."""
