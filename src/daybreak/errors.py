"""User-facing errors: the CLI prints these as one line and exits 2, never with a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, path, prompt); the message is the whole story."""


class Stopped(Exception):
    """A run stopped by a signal after saving its checkpoint: the CLI says where and exits 128 + the
    signal number (as a shell reports a process the signal ended), so `train ... && export ...` stops."""

    def __init__(self, signum: int, checkpoint) -> None:
        import signal

        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint} saved, "
                         f"the same command resumes from it")
