"""Ray on the fleet (docs/ray.md): the cluster on the nodes, and reaching it from here.

`cluster` starts and joins each node's Ray (from `fleet up` and every replacement),
`tunnel` forwards a local port to the head's loopback dashboard over SSH, `package`
zips a job's working directory, `client` is what `fleet.connect(...).ray` hands out.
The Jobs REST client itself (`fleet.worker.ray_jobs`) needs only the standard library:
nothing here imports `ray` unless a program asks for Ray's own `JobSubmissionClient`.
"""
