FROM busybox AS base
ONBUILD RUN echo trig > /trig
FROM base
RUN cat /trig > /seen
