"""The front ends and what they share: jobs (one validated request, whatever it came from), outputs and records, the
command line, torchrun and the HTTP server. A front end translates its input into a job and the job's results into
its output; it never re-implements validation."""
