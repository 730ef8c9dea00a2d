"""The commands (mta, mta-sendmail, mta-mailq) and the control socket client.
The top layer: may import everything."""
