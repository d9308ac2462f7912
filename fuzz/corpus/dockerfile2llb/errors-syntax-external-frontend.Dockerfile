# syntax=127.0.0.1:1/team/frontend:2
FROM busybox
