"""The milter client (Sendmail's milter protocol, version 6, as Postfix speaks it; issue 17).

* :mod:`~mta.policy.milter.codec`: the wire format (packets, constants, parsing);
* :mod:`~mta.policy.milter.protocol`: one connection to one milter (requests,
  answers, timeouts, faults);
* :mod:`~mta.policy.milter.check`: the ``milter`` check of the SMTP session's
  pipeline, which runs the configured milters in order and turns their
  answers into verdicts.
"""
