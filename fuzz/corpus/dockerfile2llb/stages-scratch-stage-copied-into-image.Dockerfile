FROM scratch AS files
COPY a.txt /a.txt
FROM busybox
COPY --from=files / /f/
