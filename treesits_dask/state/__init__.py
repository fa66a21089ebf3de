"""Run state: what is done (:mod:`.ledger`, one record per finished tile) and who may write
(:mod:`.lease`, one driver per output)."""
