"""Documents keep their reading warnings; units record OCR confidence and removed margins.

Revision ID: 0002_ocr_and_margins
Revises: 0001_initial
Create Date: 2026-12-03 14:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_ocr_and_margins"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Server defaults fill the rows that exist already; new rows always get values from the app.
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("warnings", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("document_units") as batch:
        batch.add_column(sa.Column("ocr_confidence", sa.Float(), nullable=True))
        batch.add_column(sa.Column("removed_header", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("removed_footer", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("document_units") as batch:
        batch.drop_column("removed_footer")
        batch.drop_column("removed_header")
        batch.drop_column("ocr_confidence")
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("warnings")
