FROM busybox AS base
RUN echo base > /base
FROM base
RUN cat /base > /copy
