"""Training, in the order it happens (qlora_ft.loop.train runs these):

    setup.py     set_up: everything a run is built from its config into one `Run` (engine, data, model, optimizer)
    resume.py    restore: the `TrainState` to start from, a fresh one or a checkpoint's
    fit.py       fit: the loop
    finish.py    finish: final validation, checkpoint and outputs (or, after a signal, stop_early)

with state.py (TrainState), plan.py (epoch plan, learning-rate schedule), validate.py (validation loss),
outputs.py (metrics and samples files) and stop.py (SIGINT/SIGTERM).
"""
