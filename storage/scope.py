"""Whose history a query may touch, decided once, in the query layer.

Every read and every delete of history takes a ``Scope`` as a required argument; there is no
default and no optional owner parameter that, left out, would widen a query to everyone's
rows. A caller's scope is ``Scope.of(owner)``. Only the admin API, which has checked
``GATEWAY_ADMIN_KEY``, builds ``Scope.everyone()``, and says so where it does.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, false, true


@dataclass(frozen=True, slots=True)
class Scope:
    owner: str
    all_owners: bool = False

    def __post_init__(self) -> None:
        if not self.owner and not self.all_owners:
            raise ValueError("a scope needs an owner")

    @classmethod
    def of(cls, owner: str) -> Scope:
        return cls(owner)

    @classmethod
    def everyone(cls) -> Scope:
        return cls("", all_owners=True)

    def where(self, table: Table) -> ColumnElement[bool]:
        """The condition that keeps ``table``'s rows (it has an ``owner`` column) in scope."""
        if self.all_owners:
            return true()
        if not storable(self.owner):
            return false()
        return table.c.owner == self.owner


def storable(text: str | None) -> bool:
    """Whether a string can be compared with stored text: no stored id, name or text holds
    NUL (PostgreSQL's text cannot), and a query that sends one is refused by PostgreSQL."""
    return text is None or "\x00" not in text
