"""owners are "<issuer> <sub>" of a JWT: up to 255 characters

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 18:30:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Widening a varchar is a catalog change in PostgreSQL: no table rewrite.
    for table in ('conversations', 'chat_requests'):
        op.alter_column(table, 'owner', type_=sa.String(length=255), existing_type=sa.String(length=128),
                        existing_nullable=False)


def downgrade() -> None:
    for table in ('conversations', 'chat_requests'):
        op.alter_column(table, 'owner', type_=sa.String(length=128), existing_type=sa.String(length=255),
                        existing_nullable=False)
