"""Where mid-epoch checkpoints may be taken; SIGTERM itself is tested end to end in test_workflow."""

from ignite.engine import Engine

from engine.training.preemption import resumable_here


def test_mid_epoch_checkpoints_only_where_a_resume_is_exact():
    trainer = Engine(lambda engine, batch: None)
    trainer.state.epoch_length, trainer.accumulation_steps = 6, 2
    verdicts = []
    for iteration in range(1, 7):
        trainer.state.iteration = iteration
        verdicts.append(resumable_here(trainer))
    assert verdicts == [False, True, False, True, False, False]  # after steps; never the epoch's last batch
    trainer.state.iteration = 2
    trainer.should_terminate = True  # TerminateOnNan: the weights may be NaN
    assert not resumable_here(trainer)
