"""The fence's netlink adapter (agent.SetElements) against replies as the kernel sends them, on
a stand-in socket: what counts as committed, what as failed, and that nothing hangs or is
read twice. tests/integration/test_fence_kernel.py runs it against the real kernel."""
import errno
import socket
import struct

import pytest

import agent

ERROR, DONE, NEW_ELEMENTS = 2, 3, 10 << 8 | 12


def message(kind, seq, payload=b"", flags=0):
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def ack(seq, error=0):
    return message(ERROR, seq, struct.pack("=i", -error) + bytes(16))


class Kernel:
    """A socket that answers each batch with what answer(seqs) returns: seqs are those of the
    batch's messages, BATCH_BEGIN first and BATCH_END last."""

    def __init__(self, answer):
        self.answer, self.replies, self.closed = answer, [], False

    def send(self, data):
        seqs, at = [], 0
        while at < len(data):
            size, _, _, seq, _ = struct.unpack_from("=IHHII", data, at)
            seqs.append(seq)
            at += size
        self.replies.extend(self.answer(seqs))
        return len(data)

    def recv(self, size):
        if not self.replies:
            raise socket.timeout("timed out")
        return self.replies.pop(0)

    def close(self):
        self.closed = True


def sets_on(answer):
    sets = agent.SetElements("bobry_fence")
    sets.sock = kernel = Kernel(answer)
    return sets, kernel


STEPS = [("delete", "fresh", [(b"\0\0\0\1", None)]), ("add", "lease", [(b"\x15\x38", 1000)])]


def test_a_batch_whose_every_step_is_acknowledged_committed():
    sets, _ = sets_on(lambda seqs: [b"".join(ack(s) for s in seqs[1:-1])])
    assert sets.commit(STEPS) == 0


def test_a_step_that_failed_fails_the_batch():
    sets, _ = sets_on(lambda seqs: [ack(seqs[1], errno.ENOENT) + ack(seqs[2])])
    assert sets.commit(STEPS) == errno.ENOENT


def test_a_commit_that_failed_after_its_steps_passed_fails_the_batch():
    """The kernel reports a failed commit against BATCH_BEGIN, then delivers the steps'
    acknowledgements, all 0 (found by a hostile read: these alone read as committed)."""
    sets, _ = sets_on(lambda seqs: [ack(seqs[0], errno.ENOMEM),
                                    b"".join(ack(s) for s in seqs[1:-1])])
    assert sets.commit(STEPS) == errno.ENOMEM


def test_replies_to_earlier_requests_are_not_taken_for_this_ones():
    sets, _ = sets_on(lambda seqs: [ack(seqs[-1] + 5, errno.ENOENT) + ack(seqs[1]),
                                    ack(seqs[2])])
    assert sets.commit(STEPS) == 0


def test_no_answer_is_an_oserror_and_a_new_socket_next_time():
    sets, kernel = sets_on(lambda seqs: [])
    with pytest.raises(OSError):
        sets.commit(STEPS)
    assert kernel.closed and sets.sock is None


def test_the_sequence_number_wraps_at_32_bits():
    sets, _ = sets_on(lambda seqs: [b"".join(ack(s) for s in seqs[1:-1])])
    sets.seq = 0xFFFFFFFF - 1
    assert sets.commit(STEPS) == 0
    assert sets.seq == 3  # BATCH_BEGIN 0xFFFFFFFF, the steps 1 and 2, BATCH_END 3
    assert sets.commit(STEPS) == 0


def element_reply(seq, key, ms_left, flags=0):
    attr, nested = agent.SetElements._attr, agent.SetElements("t")._nested
    element = nested(1, nested(1, attr(1, key)), attr(5, struct.pack(">Q", ms_left)))
    return message(NEW_ELEMENTS, seq, bytes(4) + nested(3, element), flags)


def test_a_listing_ends_at_done_and_a_failed_or_interrupted_one_is_an_oserror():
    sets, _ = sets_on(lambda seqs: [element_reply(seqs[0], b"\x15\x38", 800)
                                    + message(DONE, seqs[0], bytes(4))])
    assert sets.elements("lease") == [(b"\x15\x38", 800)]
    sets, _ = sets_on(lambda seqs: [message(DONE, seqs[0], struct.pack("=i", -errno.EBUSY))])
    with pytest.raises(OSError) as failed:
        sets.elements("lease")
    assert failed.value.errno == errno.EBUSY
    sets, _ = sets_on(lambda seqs: [element_reply(seqs[0], b"\x15\x38", 800, flags=0x10)])
    with pytest.raises(OSError) as interrupted:
        sets.elements("lease")
    assert interrupted.value.errno == errno.EINTR
