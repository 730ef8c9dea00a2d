"""The running daemon: the service wiring it all, start-up, workers, the control
socket server, metrics and logs.  May import everything but mta.admin."""
