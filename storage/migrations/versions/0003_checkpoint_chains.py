"""Checkpoints can extend a parent checkpoint and carry per-block checksums.

Revision ID: 0003_checkpoint_chains
Revises: 0002_ocr_and_margins
Create Date: 2026-12-03 17:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_checkpoint_chains"
down_revision: str | Sequence[str] | None = "0002_ocr_and_margins"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows keep NULLs: no parent, and a whole-file checksum verified the old way.
    with op.batch_alter_table("state_checkpoints") as batch:
        batch.add_column(sa.Column("parent_key", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("parent_checksum", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("block_size", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("block_checksums", sa.JSON(), nullable=True))
        batch.create_index(batch.f("ix_state_checkpoints_parent_key"), ["parent_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("state_checkpoints") as batch:
        batch.drop_index(batch.f("ix_state_checkpoints_parent_key"))
        batch.drop_column("block_checksums")
        batch.drop_column("block_size")
        batch.drop_column("parent_checksum")
        batch.drop_column("parent_key")
