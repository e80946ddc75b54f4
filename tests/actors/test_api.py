"""The public surface is pinned."""

import actors
import actors.testing


def test_public_names() -> None:
    assert sorted(actors.__all__) == sorted(
        [
            "DEFAULT_MAILBOX_SIZE",
            "ESCALATE",
            "RESTART",
            "STOP",
            "Actor",
            "ActorError",
            "ActorFailed",
            "ActorRef",
            "ActorStopped",
            "ActorSystem",
            "AskTimeout",
            "Backoff",
            "Later",
            "MailboxFull",
            "Policy",
            "UnhandledMessage",
            "handles",
            "later",
            "open_system",
        ]
    )
    for name in actors.__all__:
        assert getattr(actors, name) is not None


def test_testing_names() -> None:
    assert sorted(actors.testing.__all__) == ["Probe", "ReplyFn", "run_actor", "spawn_probe"]


def test_error_hierarchy() -> None:
    for exc in (
        actors.MailboxFull,
        actors.ActorStopped,
        actors.AskTimeout,
        actors.ActorFailed,
        actors.UnhandledMessage,
    ):
        assert issubclass(exc, actors.ActorError)
    assert issubclass(actors.AskTimeout, TimeoutError)
    assert issubclass(actors.ActorError, Exception)


def test_policies() -> None:
    assert {actors.STOP, actors.RESTART, actors.ESCALATE} == set(actors.Policy)
