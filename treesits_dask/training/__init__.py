"""Training and evaluation: reference samples (:mod:`.samples`, :mod:`.points`, :mod:`.gpkg`,
:mod:`.sample_csv`), their time series read from the cube (:mod:`.extract`), model fitting
(:mod:`.fit`), accuracy measures (:mod:`.metrics`) and the ``train`` / ``evaluate`` commands'
logic (:mod:`.train`)."""
