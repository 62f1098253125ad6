"""``just chaos``: three nodes on their own Redis, PostgreSQL and RabbitMQ, a thousand clients,
publishers on every door, seeded faults, and an audit of every acknowledged message
(docs/development.md, "The chaos run")."""
