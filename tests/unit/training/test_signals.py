"""StopOnSignal: handles SIGTERM / SIGUSR1 only while training, and never swallows one it could not act on."""

from __future__ import annotations

import os
import signal

from transformers import TrainerControl, TrainerState

from finetune.training.signals import StopOnSignal


def test_handlers_are_installed_only_inside_the_block_and_a_signal_stops_at_the_step_end():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        stopper = StopOnSignal()
        with stopper.installed():
            state, control = TrainerState(), TrainerControl()
            state.global_step = 7
            stopper.on_step_end(None, state, control)
            assert not control.should_save and not control.should_training_stop
            os.kill(os.getpid(), signal.SIGUSR1)
            stopper.on_step_end(None, state, control)
            assert control.should_save and control.should_training_stop
        assert seen == []  # acted on: not passed on to the handler that was there before
        assert signal.getsignal(signal.SIGUSR1) is not stopper._handle
        error = stopper.interruption("run/checkpoints")
        assert error.signum == signal.SIGUSR1 and str(error).startswith(
            "stopped by SIGUSR1 after step 7: run/checkpoints/checkpoint-7 saved")
        os.kill(os.getpid(), signal.SIGUSR1)  # after the block: the previous handler's again
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_that_came_after_the_last_step_is_passed_on_when_training_returns():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        stopper = StopOnSignal()
        with stopper.installed():
            os.kill(os.getpid(), signal.SIGTERM)  # no step end follows
            assert seen == []
        assert seen == [signal.SIGTERM] and stopper.interruption("x") is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_only_a_requeued_slurm_job_without_a_resume_setting_resumes_by_itself():
    from omegaconf import OmegaConf

    from finetune.training.checkpoints import requeued_resume

    def cfg(value=None):
        return OmegaConf.create({"trainer": {"resume_from_checkpoint": value}})

    for environ in ({}, {"SLURM_RESTART_COUNT": "0"}, {"SLURM_RESTART_COUNT": ""}):
        c = cfg()
        assert not requeued_resume(c, environ) and c.trainer.resume_from_checkpoint is None
    c = cfg()
    assert requeued_resume(c, {"SLURM_RESTART_COUNT": "2"}) and c.trainer.resume_from_checkpoint == "auto"
    c = cfg("runs/x/checkpoints/checkpoint-50")  # the user's own choice stands
    assert not requeued_resume(c, {"SLURM_RESTART_COUNT": "1"})
    assert c.trainer.resume_from_checkpoint == "runs/x/checkpoints/checkpoint-50"


def test_ctrl_c_stops_at_the_step_end_and_a_second_ctrl_c_stops_at_once(capsys):
    import pytest

    stopper = StopOnSignal()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background (&)
    with stopper.installed():
        state, control = TrainerState(), TrainerControl()
        state.global_step = 3
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the step under way goes on
        assert "Ctrl-C: the step under way finishes and is saved" in capsys.readouterr().err
        stopper.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert "Ctrl-C again: stopping now" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # put back as it was
    assert str(stopper.interruption("r/checkpoints")).startswith("stopped by SIGINT after step 3: "
                                                                 "r/checkpoints/checkpoint-3 saved")
