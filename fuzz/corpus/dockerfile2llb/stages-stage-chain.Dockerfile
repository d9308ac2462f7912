FROM busybox AS a
RUN echo a > /a
FROM a AS b
RUN echo b > /b
FROM b
RUN cat /a /b > /ab
