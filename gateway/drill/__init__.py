"""The AZ failover drill, run for real on one machine (``make drill``, ``edge-gateway drill``).

Three gateway instances stand for three availability zones behind HAProxy (checking ``/readyz``
like the ALB); simulated devices send signed requests through it at a steady rate and retry as
firmware does; the runbook's steps (``deploy/runbooks/az-failover.yaml``, shared with the cloud
drill) shift traffic away from one zone, lose another, restore both and count the lake:

    runbook.py  the runbook: steps, thresholds            settings.py  the drill's shape (drill.toml)
    fleet.py    instances and HAProxy                     devices.py   simulated devices and their log
    monitor.py  /metrics and HAProxy samples              lake.py      what landed where, and when
    steps.py    the five steps and their checks           report.py    report.md, report.json, timeline.png
    run.py      the command
"""
