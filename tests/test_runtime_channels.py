"""The table of channels: complete, true to the messages, and what the actors act on."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from decolla.actors.requester import Requester
from decolla.actors.worker import Worker
from decolla.baselines import actors as baseline_actors
from decolla.baselines.messages import PIPELINE_CHANNELS
from decolla.runtime import channels, dataplane, messages
from decolla.runtime.channels import CHANNELS, Channel, Path, Taken


def _message_types(module) -> list[type]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, messages.Message) and c is not messages.Message
            and c.__module__ == module.__name__]


def test_every_runtime_message_has_one_channel():
    parts_only = {messages.DeviceInfo}        # travels inside Membership, never alone
    assert set(_message_types(messages)) - parts_only == set(CHANNELS)


@pytest.mark.parametrize("channel", list(PIPELINE_CHANNELS.values()),
                         ids=lambda c: c.message.__name__)
def test_tensor_fields_exist(channel):
    names = {f.name for f in dataclasses.fields(channel.message)}
    assert set(channel.tensors) <= names


def test_a_message_type_has_one_channel():
    with pytest.raises(ValueError):
        channels.table(Channel(messages.Cancel, "a"), Channel(messages.Cancel, "b"))


@pytest.mark.parametrize("actor,table", [(Worker, CHANNELS), (Requester, CHANNELS),
                                         (baseline_actors.SegmentWorker, PIPELINE_CHANNELS),
                                         (baseline_actors.PipelineRequester, PIPELINE_CHANNELS)],
                         ids=lambda a: getattr(a, "__name__", ""))
def test_actors_handle_the_data_plane_messages_their_channels_give_them(actor, table):
    reader = channels.received_by(table, actor.RECEIVER, Taken.READER)
    on_actor = channels.received_by(table, actor.RECEIVER, Taken.ACTOR)
    assert reader or on_actor
    assert all(hasattr(actor, "takeMsg_" + t.__name__) for t in reader)
    assert all(hasattr(actor, "receiveMsg_" + t.__name__) for t in on_actor)


class _Sender(dataplane.WatchesInbox):
    """A WatchesInbox without an actor system: records what goes where."""

    def __init__(self):
        self.sent, self.myAddress = [], None
        self.peers = self

    def send(self, target, msg):          # actor message, or data plane (as Peers.send)
        self.sent.append(("data" if isinstance(target, tuple) else "actor", msg))
        return True


def test_send_data_takes_the_data_plane_only_where_the_channel_allows():
    s = _Sender()
    s.send_data(("127.0.0.1", 1), "worker", messages.Cancel("r"))
    s.send_data(("127.0.0.1", 1), "registrar", messages.Unsubscribe())
    assert [(how, type(m).__name__) for how, m in s.sent] == [("data", "Cancel"),
                                                               ("actor", "Unsubscribe")]
    with pytest.raises(KeyError):           # a message without a channel is a mistake
        s.send_data(("127.0.0.1", 1), "worker", "hello")


def test_data_plane_channels_are_the_chunk_traffic():
    data = {t.__name__ for t, c in CHANNELS.items() if c.path is Path.DATA}
    assert data == {"StageWork", "Cancel", "LinkProbe", "Halo", "ChunkResult", "ChunkResults",
                    "ChunkFailed", "LinkEcho"}
