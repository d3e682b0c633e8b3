"""Erasing an owner for good: records of theirs that arrive after the erasure are dropped.

Erasing a user deletes their history, but records of theirs may still be on their way: in
this gateway's spool while the database was slow, in another replica's, on the disk of a
replica that died and is adopted days later. Written after the erasure, they would bring
back what it erased. So the erasure leaves the owner in ``erased_owners``, and each batch
the writer writes looks there, in the batch's own transaction, after its rows are written:
a batch holding an erased owner's record is rolled back and written again without it.

What makes that hold while both run at once is ``erasure_gate``'s one row. A batch reads it
in share mode (batches do not wait for each other); an erasure updates it, so it waits for
the batches being written to commit, which its deletion then sees, and the batches after
it wait for the erasure to commit, and then see the owner erased. SQLite needs no gate: a
batch holds the database's write lock from its first row on, so nothing commits between
its rows and its look. The writer keeps the erased owners in memory and reads them again
only when the gate's generation has moved: a batch costs one more statement.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from capture.rows import RowSet
from storage.batch import insert_ignore
from storage.schema import erased_owners, erasure_gate


class Erased(Exception):  # noqa: N818 - a signal to write the batch again, not an error
    """A batch held records of erased owners: write it again without them."""

    def __init__(self, owners: frozenset[str]) -> None:
        super().__init__(f"records of {len(owners)} erased owner(s)")
        self.owners = owners


async def erase_owner(connection: AsyncConnection, owner: str) -> None:
    """Mark ``owner`` erased. Commit it before deleting their history: the batches being
    written commit first (the deletion sees them), and the later ones drop their records."""
    await connection.execute(
        update(erasure_gate)
        .where(erasure_gate.c.id == 1)
        .values(generation=erasure_gate.c.generation + 1)
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    await connection.execute(
        insert_ignore(connection, erased_owners), [{"owner": owner, "erased_at": now}]
    )


class Erasures:
    """The erased owners as this writer last read them, and the gate's generation then."""

    def __init__(self) -> None:
        self.generation: int | None = None
        self.owners: frozenset[str] = frozenset()

    def holds(self, rowset: RowSet) -> bool:
        """Whether ``rowset`` is an owner's known erased."""
        return bool(self.owners) and not self.owners.isdisjoint(rowset.owners())

    async def check(self, connection: AsyncConnection, rowsets: Iterable[RowSet]) -> None:
        """In a batch's transaction, after its rows: raise ``Erased`` if it holds records of
        an owner erased meanwhile (the transaction is then rolled back)."""
        generation = await connection.scalar(
            select(erasure_gate.c.generation)
            .where(erasure_gate.c.id == 1)
            .with_for_update(read=True)
        )
        if generation != self.generation:
            self.owners = frozenset(await connection.scalars(select(erased_owners.c.owner)))
            self.generation = generation
        if self.owners:
            found = frozenset().union(*(rowset.owners() for rowset in rowsets)) & self.owners
            if found:
                raise Erased(found)
