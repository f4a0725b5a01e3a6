"""LocalPostgres marks a rewind until it is complete, and reads pg_control through
pg_controldata: the timeline of the rejoin check and whether a pg_rewind ran to its end. The
output is PostgreSQL 15's, taken from scratch clusters on this machine (an old primary stopped
-m immediate, then rewound onto its promoted standby); a stand-in pg_controldata prints it."""
import dataclasses
import os
import pwd
import subprocess
from pathlib import Path

import pytest

import agent

REPO = Path(__file__).resolve().parents[2]

HEAD = """pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7712508233007991721
Database cluster state:               {state}
pg_control last modified:             Thu Nov 26 15:50:59 2026
Latest checkpoint location:           0/3018170
Latest checkpoint's REDO location:    0/3018138
Latest checkpoint's REDO WAL file:    000000020000000000000003
Latest checkpoint's TimeLineID:       {tli}
Latest checkpoint's PrevTimeLineID:   {tli}
Minimum recovery ending location:     0/5000028
Bytes per WAL segment:                16777216
"""


def local_postgres(tmp_path, state, tli):
    """A LocalPostgres whose pg_controldata prints HEAD, untranslated only (LC_ALL=C)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "out").write_text(HEAD.format(state=state, tli=tli))
    script = bin_dir / "pg_controldata"
    script.write_text(f'#!/bin/sh\n[ "$LC_ALL" = C ] || exit 1\ncat "{bin_dir}/out"\n')
    script.chmod(0o755)
    cfg = agent.load_config(str(REPO / "agent.ini"), "pg1")
    pg = agent.LocalPostgres(dataclasses.replace(cfg, pg_bin=str(bin_dir),
                                                 data_dir=str(tmp_path / "data")))
    pg.owner = pwd.getpwuid(os.geteuid())  # run it as ourselves, not as PostgreSQL's user
    return pg


@pytest.mark.parametrize("state, rewound", [
    ("in archive recovery", True),   # pg_rewind's last write (and a standby's, running or not)
    ("in production", False),        # an old primary killed or stopped -m immediate
    ("shut down", False),            # stopped cleanly, or after pg_rewind's crash recovery
    ("shut down in recovery", False),
])
def test_rewound_is_what_pg_control_says(tmp_path, state, rewound):
    pg = local_postgres(tmp_path, state, 2)
    assert pg.rewound() is rewound
    assert pg.timeline() == 2


def test_no_pg_control_is_an_error(tmp_path):
    pg = local_postgres(tmp_path, "in production", 1)
    (tmp_path / "bin" / "out").write_text("")
    with pytest.raises(RuntimeError, match="pg_controldata: no Database cluster state"):
        pg.rewound()


def test_a_rewind_leaves_its_mark_until_standby_signal_or_move_aside(tmp_path):
    """LocalPostgres.rewind marks the state directory durably before pg_rewind runs; only
    make_standby (after a complete rewind) or move_aside takes the mark away, so a rewind
    killed or timed out half-way is seen by the restarted agent (decision "reclone")."""
    pg = local_postgres(tmp_path, "in production", 1)
    pg.cfg = dataclasses.replace(pg.cfg, state_dir=str(tmp_path / "state"))
    os.makedirs(pg.cfg.state_dir)
    os.makedirs(pg.cfg.data_dir)
    rewind = tmp_path / "bin" / "pg_rewind"
    rewind.write_text("#!/bin/sh\necho 'pg_rewind: fatal: could not connect' >&2\nexit 1\n")
    rewind.chmod(0o755)
    assert pg.rewind_mark() is None
    with pytest.raises(RuntimeError, match="could not connect"):
        pg.rewind(agent.View(2, "pg2", None), "boot-1")
    assert pg.rewind_mark() == "boot-1"  # it may have copied files before it failed
    pg.make_standby(agent.View(2, "pg2", None))
    assert pg.rewind_mark() is None
    with pytest.raises(RuntimeError):
        pg.rewind(agent.View(2, "pg2", None), "boot-1")
    aside = pg.move_aside()
    assert pg.rewind_mark() is None and os.path.isdir(aside)


def test_the_wal_recovery_needs_is_a_rewinds_label_or_else_the_redo_of_pg_control(tmp_path):
    pg = local_postgres(tmp_path, "in archive recovery", 2)
    wal = tmp_path / "data" / "pg_wal"
    wal.mkdir(parents=True)
    (wal / "000000020000000000000004").write_text("")
    (wal / "00000002.history").write_text("")
    needed, files, valid_until, segment_bytes = pg.wal_needs()
    assert needed == "000000020000000000000003" and segment_bytes == 16 * 1024 * 1024
    assert valid_until == 0x5000028  # the minimum recovery point, later than the REDO
    assert sorted(files) == ["00000002.history", "000000020000000000000004"]
    (tmp_path / "data" / "backup_label").write_text(  # as pg_rewind of PostgreSQL 15 writes it
        "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
        "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: pg_rewind\n"
        "BACKUP FROM: standby\nSTART TIME: 2026-11-27 00:54:20 UTC\n")
    assert pg.wal_needs()[0] == "000000010000000000000002"


MIB16 = 16 * 1024 * 1024


@pytest.mark.parametrize("needed, local, source, missing", [
    # the primary still holds it: nothing missing
    ("000000010000000000000003", [], ["000000020000000000000003", "000000020000000000000004"],
     None),
    # a long outage: the primary recycled segments 3 to 0x28 (what happened in the lab)
    ("000000010000000000000003", [], ["000000020000000000000029", "00000002000000000000002A"],
     "000000010000000000000003"),
    # our own pg_wal bridges the gap up to the primary's oldest
    ("000000010000000000000003", ["000000010000000000000003", "000000020000000000000004"],
     ["000000020000000000000005"], None),
    # ... but not with a hole in it
    ("000000010000000000000003", ["000000010000000000000003", "000000020000000000000005"],
     ["000000020000000000000006"], "000000010000000000000004"),
    # ... nor with names past our valid WAL (segment 5 here): recycled files renamed ahead
    ("000000010000000000000003", ["000000010000000000000003", "000000010000000000000004",
                                  "000000010000000000000005", "000000010000000000000006"],
     ["000000010000000000000007"], "000000010000000000000006"),
    # segment numbers run on across a log id (0x100 segments of 16 MiB each)
    ("0000000100000000000000FF", ["0000000100000000000000FF"], ["000000010000000100000000"],
     None),
    ("0000000100000000000000FE", ["0000000100000000000000FE"], ["000000010000000100000000"],
     "0000000100000000000000FF"),
    # names that are no segment count for nothing; a primary listing none cannot judge
    ("000000010000000000000003", ["00000002.history", "000000010000000000000003.partial"],
     ["archive_status"], None),
])
def test_wal_gap(needed, local, source, missing):
    valid_until = 0x1_00000010 if needed.endswith(("FE", "FF")) else 0x5000028  # our REDO
    assert agent.wal_gap(needed, local, valid_until, source, MIB16) == missing


def test_postgresql_log_is_read_from_where_the_last_look_ended(tmp_path):
    pg = local_postgres(tmp_path, "in archive recovery", 2)
    pg.logfile = str(tmp_path / "postgresql.log")
    assert pg.log_since(None) == ("", 0)  # no log yet
    with open(pg.logfile, "a") as f:
        f.write("LOG:  started streaming WAL\n")
    text, offset = pg.log_since(None)
    assert "started streaming" in text and offset == 28
    with open(pg.logfile, "a") as f:
        f.write("FATAL:  could not receive data from WAL stream: ERROR:  requested WAL segment "
                "000000020000000000000003 has already been removed\n")
    text, offset = pg.log_since(offset)
    assert "started" not in text and agent.WAL_REMOVED.search(text)
    assert pg.log_since(offset) == ("", offset)
    with open(pg.logfile, "w") as f:  # rotated: shorter than where we were
        f.write("LOG:  new\n")
    assert pg.log_since(offset) == ("LOG:  new\n", 10)


def test_running_means_a_process_that_lives_in_the_data_directory(tmp_path):
    pg = local_postgres(tmp_path, "in archive recovery", 2)
    data = tmp_path / "data"
    data.mkdir()
    assert pg.running() is False  # no postmaster.pid
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n")
    assert pg.running() is False  # a stale file naming a live process elsewhere (this one)
    child = subprocess.Popen(["sleep", "30"], cwd=data)
    try:
        (data / "postmaster.pid").write_text(f"{child.pid}\n{data}\n")
        assert pg.running() is True
    finally:
        child.kill()
        child.wait()
    assert pg.running() is False  # gone
    (data / "postmaster.pid").write_text("garbage\n")
    assert pg.running() is False
