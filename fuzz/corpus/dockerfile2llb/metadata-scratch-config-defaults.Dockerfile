FROM scratch
COPY a.txt /
