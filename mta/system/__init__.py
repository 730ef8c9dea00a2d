"""Operating-system and network helpers (files, fsync, epoll, socket writes,
DNS set-up, TLS, PROXY).  May import mta.config and mta.mail only."""
