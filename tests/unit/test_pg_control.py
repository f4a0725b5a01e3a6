"""LocalPostgres marks a rewind until it is complete, and reads pg_control through
pg_controldata: the timeline of the rejoin check and whether a pg_rewind ran to its end. The
output is PostgreSQL 15's, taken from scratch clusters on this machine (an old primary stopped
-m immediate, then rewound onto its promoted standby); a stand-in pg_controldata prints it."""
import dataclasses
import os
import pwd
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
