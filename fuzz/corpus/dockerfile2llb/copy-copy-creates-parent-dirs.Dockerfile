FROM scratch
COPY a.txt /deep/er/path/
