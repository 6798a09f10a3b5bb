"""The database: one SQLAlchemy metadata, engines and sessions (`node.db.database`), the node's
tables (`node.db.schema`), the Alembic revisions (``node/db/migrations/``, shipped in the
package) and the developer tool that writes new ones (`node.db.revisions`)."""
