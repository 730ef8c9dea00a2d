"""Taking a message in without SMTP: local submission.  May import policy,
delivery, queue and below, never smtp, daemon or admin."""
