FROM scratch
COPY a.txt /wrong
